"""VDDS-media ("VDDS Multimedia-Schnittstelle"): exchange files of stages 1 to 5, the stage-6 push file
and the VDDS_MMI.INI registry.

Reading and answering the exchange file itself lives in `protocols.vdds_exchange` (imported here, so this
module is the protocol's one entry point), kept light for the launch client's daemon-down answer.

A PVS (the practice management system) writes an INI "exchange file" and starts the BVS's registered
program with its path; the BVS (us) writes the answer into the same file and sets READY=1 last. This module
turns those bytes into a `PatientRequest` and an `Outcome` back into bytes. It is pure (no I/O, no clock)
and imports only the standard library and `bridge.model`.

What is confirmed and what is inferred (and configurable) is written down in docs/vdds.md; the facts come
from the reference notes, protocols.md section 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from bridge.model import (
    Action,
    Category,
    Demographics,
    ImageView,
    Origin,
    Outcome,
    PatientRequest,
    Sex,
    Status,
)
from protocols.common import (
    DateFormatError,
    DecodedText,
    FutureDateError,
    IniSection,
    decode,
    ini_line,
    parse_date,
    parse_ini,
    parse_sex,
    render_ini,
)
from protocols.vdds_exchange import (
    DEMOGRAPHIC_KEYS,
    Exchange,
    Kind,
    Section,
    clean,
    errorlevel_ok,
    message,
    numbered,
)

# --------------------------------------------------------------------------------------------------
# Vocabulary


EXPORT_FORMATS = ("JPG", "PNG", "TIF", "DCM")
_FORMAT_ALIASES = {"JPEG": "JPG", "TIFF": "TIF", "DICOM": "DCM"}
_TRUE = frozenset({"1", "J", "JA", "Y", "YES", "TRUE", "ON"})

BIRTH_DATE_FORMATS = ("%Y%m%d", "%d.%m.%Y", "%Y-%m-%d")

# Longest value accepted per field (the store's column sizes); longer is refused, never truncated,
# because a truncated id is another patient's id. Kept here so the refusal names the VDDS key in the
# PVS's language; test_the_vdds_field_limits_are_the_stores holds them to bridge.store.limits.
LIMITS: dict[str, int] = {
    "PATID": 100,
    "PVS": 100,
    "PRXNR": 100,
    "MMOID": 40,
    "last_name": 120,
    "first_name": 120,
    "title": 40,
    "street": 200,
    "city": 120,
    "postal_code": 20,
    "phone": 60,
    "email": 200,
}

# What TYPE (text) and TYPENR (number, the spec's "Table 15") say for each image category. Only 10
# (Formular) and 14 (Heil- und Kostenplan) are known from public sources; the image numbers are an
# assumption the practice can change ([vdds] type_numbers).
DEFAULT_TYPE_NAMES: dict[str, str] = {
    Category.INTRAORAL_XRAY: "Röntgenbild intraoral",
    Category.EXTRAORAL_XRAY: "Röntgenbild extraoral",
    Category.PANORAMIC: "OPG",
    Category.CEPHALOMETRIC: "FRS",
    Category.CBCT: "DVT",
    Category.PHOTO: "Foto",
    Category.DOCUMENT: "Dokument",
}
DEFAULT_TYPE_NUMBERS: dict[str, str] = {
    Category.INTRAORAL_XRAY: "1",
    Category.EXTRAORAL_XRAY: "1",
    Category.PANORAMIC: "1",
    Category.CEPHALOMETRIC: "1",
    Category.CBCT: "1",
    Category.PHOTO: "2",
    Category.DOCUMENT: "10",
}


class VddsError(Exception):
    """A request that cannot be served as written; `code` names its answer text in TEXTS."""

    def __init__(self, code: str, **values: object) -> None:
        super().__init__(message("en", code, **values))
        self.code = code
        self.values = values

    def text(self, language: str) -> str:
        return message(language, self.code, **self.values)


@dataclass(frozen=True)
class Options:
    """The settings that shape parsing and answers (built from `[vdds]` by the handler)."""

    language: str = "de"
    default_pvs: str = "VDDS"  # pms_system when a request has no PVS key
    practice_key: str = "PRXNR"  # the key read as practice id; empty: requests carry none
    stage5: str = "off"  # off | always | flagged: when a stage-1 handover also requests an acquisition
    stage5_key: str = "ACQUIRE"  # flagged: this key (1/J/Y) or the launch argument ACQUIRE marks it
    thumbnail_key: str = "THUMBNAIL"  # key naming the thumbnail file in [MMOn]; empty: no thumbnails
    default_format: str = "JPG"  # MMOEXPORT without EXT
    require_ready: bool = True  # a request without READY is a truncated file, not served
    max_mmoids: int = 500
    type_names: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TYPE_NAMES))
    type_numbers: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TYPE_NUMBERS))


# --------------------------------------------------------------------------------------------------
# Request -> PatientRequest


def _value(section: IniSection, key: str, *, limit_key: str = "") -> str:
    value = section.get(key).strip()
    limit = LIMITS.get(limit_key or key, 0)
    if limit and len(value) > limit:
        raise VddsError("too_long", key=key, limit=limit)
    return value


def _first(section: IniSection, field_name: str) -> str:
    for key in DEMOGRAPHIC_KEYS[field_name]:
        value = section.get(key).strip()
        if value:
            limit = LIMITS.get(field_name, 0)
            if limit and len(value) > limit:
                raise VddsError("too_long", key=key, limit=limit)
            return value
    return ""


def demographics(section: IniSection, today: date) -> Demographics:
    """Patient data from a stage-1 section, tolerating the German key variants and every date form;
    a birth date after `today` (and a day's slack, `latest_birth_date`) is refused."""
    birth_text = _first(section, "birth_date")
    try:
        birth = parse_date(birth_text, BIRTH_DATE_FORMATS, today=today)
    except FutureDateError:
        raise VddsError("future_date", value=birth_text[:20]) from None
    except DateFormatError:
        raise VddsError("bad_date", value=birth_text[:20]) from None
    return Demographics(
        last_name=_first(section, "last_name"),
        first_name=_first(section, "first_name"),
        title=_first(section, "title"),
        birth_date=birth,
        sex=Sex(parse_sex(_first(section, "sex"))),
        street=_first(section, "street"),
        city=_first(section, "city"),
        postal_code=_first(section, "postal_code"),
        phone=_first(section, "phone"),
        email=_first(section, "email"),
    )


def export_slots(section: IniSection, limit: int) -> list[tuple[int, str]]:
    """(k, MMOID) of an [MMOIDS] request: MMOID1..MMOID<COUNT>, or every MMOIDk when COUNT is unusable.

    The answer's [MMOPATH] uses the same k, so the numbers are kept, gaps included.
    """
    by_k: dict[int, str] = {}
    for key, value in section.items():
        k = numbered(key, "MMOID")
        if k is not None and value.strip():
            by_k.setdefault(k, value.strip())
    count_text = section.get("COUNT").strip()
    if count_text.isascii() and count_text.isdigit() and 0 < int(count_text) <= 10 * limit:
        count = int(count_text)
        if count > limit:
            raise VddsError("too_many", count=count, limit=limit)
        slots = [(k, by_k[k]) for k in range(1, count + 1) if k in by_k]
    else:
        slots = sorted(by_k.items())
    if len(slots) > limit:
        raise VddsError("too_many", count=len(slots), limit=limit)
    for _k, ref in slots:
        if len(ref) > LIMITS["MMOID"]:
            raise VddsError("too_long", key="MMOID", limit=LIMITS["MMOID"])
    if not slots:
        raise VddsError("no_mmoids")
    return slots


def export_format(value: str, default: str) -> str:
    """The wanted export format from EXT (case, a leading dot and JPEG/TIFF/DICOM spellings tolerated)."""
    text = value.strip().lstrip(".").upper()
    text = _FORMAT_ALIASES.get(text, text) or default.upper()
    if text not in EXPORT_FORMATS:
        raise VddsError("bad_format", value=value[:20])
    return text


def wants_acquisition(section: IniSection, options: Options, args: Sequence[str]) -> bool:
    """Stage 5 (assumed: an acquisition request): off, every handover, or handovers flagged as such."""
    if options.stage5 == "always":
        return True
    if options.stage5 != "flagged":
        return False
    flagged_arg = any(arg.strip().upper() == "ACQUIRE" for arg in args)
    return flagged_arg or section.get(options.stage5_key).strip().upper() in _TRUE


def patient_request(
    exchange: Exchange, origin: Origin, options: Options, args: Sequence[str] = (), *, today: date
) -> PatientRequest:
    """The `PatientRequest` an exchange file asks for; raises VddsError for what cannot be served.

    pms_system is the PVS key (the PVS's section name in VDDS_MMI.INI), or `default_pvs` when a PVS
    omits it; the practice id is the `practice_key` value (PRXNR), empty when absent. `today` is the
    daemon's date, which a birth date may not be after (`demographics`).
    """
    section = exchange.request
    if exchange.kind is Kind.AMBIGUOUS:
        raise VddsError("ambiguous", sections=", ".join(f"[{name}]" for name in exchange.targets))
    if section is None or exchange.kind in (Kind.UNKNOWN, Kind.MMOINFIMPORT):
        raise VddsError("unknown_request")
    if options.require_ready and "READY" not in section:
        raise VddsError("incomplete")
    pvs = _value(section, "PVS") or options.default_pvs
    practice = _value(section, options.practice_key, limit_key="PRXNR") if options.practice_key else ""
    if exchange.kind is Kind.MMOEXPORT:
        slots = export_slots(section, options.max_mmoids)
        return PatientRequest(
            action=Action.EXPORT_IMAGES,
            origin=origin,
            pms_system=pvs,
            practice_id=practice,
            pms_id=_value(section, "PATID"),
            image_refs=tuple(ref for _k, ref in slots),
            export_format=export_format(section.get("EXT"), options.default_format),
        )
    patid = _value(section, "PATID")
    if not patid:
        raise VddsError("no_patid")
    if exchange.kind is Kind.MMOINFEXPORT:
        return PatientRequest(
            action=Action.LIST_IMAGES, origin=origin, pms_system=pvs, pms_id=patid, practice_id=practice
        )
    action = Action.ACQUIRE if wants_acquisition(section, options, args) else Action.OPEN
    return PatientRequest(
        action=action,
        origin=origin,
        pms_system=pvs,
        pms_id=patid,
        practice_id=practice,
        demographics=demographics(section, today),
    )


def view_request(mmoid: str, origin: Origin) -> PatientRequest:
    """Stage 3 MMOVIEW: `<program> <MMOID>` on the command line, no exchange file."""
    ref = mmoid.strip()
    if not ref:
        raise VddsError("no_mmoids")
    if len(ref) > LIMITS["MMOID"]:
        raise VddsError("too_long", key="MMOID", limit=LIMITS["MMOID"])
    return PatientRequest(action=Action.VIEW_IMAGE, origin=origin, pms_system="", image_refs=(ref,))


# --------------------------------------------------------------------------------------------------
# Answer sections (the answer itself: protocols.vdds_exchange.answer)


def shown_time(image: ImageView) -> datetime | None:
    """The time an object's DATE and TIME show: the capture, else the import, as the practice's wall
    clock (naive; the import time is UTC and is converted to local time)."""
    at = image.captured_at or image.imported_at
    if at is not None and at.tzinfo is not None:
        at = at.astimezone().replace(tzinfo=None)
    return at


def object_pairs(
    image: ImageView,
    options: Options,
    *,
    prxnr: str = "",
    thumbnail: str = "",
    imagedata: str = "",
) -> list[tuple[str, str]]:
    """One [MMOn] section: the object structure of stage 2 and of the stage-6 push ("Table 7").

    MMOID is the store's image id as a decimal string; DATE is CCYYMMDD and TIME HH:MM of the capture
    (of the import when the capture time is unknown).
    """
    at = shown_time(image)
    comment = image.comment
    if image.tooth_numbers:
        teeth = ", ".join(str(t) for t in image.tooth_numbers)
        label = "Zahn" if options.language == "de" else "Tooth"
        comment = f"{comment} ({label} {teeth})" if comment else f"{label} {teeth}"
    pairs = [("MMOID", str(image.id))]
    if prxnr:
        pairs.append(("PRXNR", prxnr))
    pairs += [
        ("TYPE", options.type_names.get(image.category, image.category.value)),
        ("TYPENR", options.type_numbers.get(image.category, "")),
        ("EXT", _FORMAT_ALIASES.get(image.file_ext.upper(), image.file_ext.upper())),
        ("DATE", at.strftime("%Y%m%d") if at else ""),
        ("TIME", at.strftime("%H:%M") if at else ""),
        ("COMMENT", comment),
    ]
    if options.thumbnail_key and thumbnail:
        pairs.append((options.thumbnail_key, thumbnail))
    if imagedata:
        pairs.append(("IMAGEDATA", imagedata))
    return pairs


def info_sections(
    images: Sequence[ImageView], options: Options, thumbnails: Mapping[int, str], prxnr: str = ""
) -> list[Section]:
    """Stage 2's answer: [MMOS] COUNT and one [MMOn] per image, newest first by the time DATE shows.

    The store lists by capture time, and images without one last; a photo dated by its import would
    then follow older captures although its DATE is newer. Objects without any time come last; equal
    times list the newer image (higher id) first.
    """
    sections: list[Section] = [("MMOS", [("COUNT", str(len(images)))])]
    ordered = sorted(images, key=lambda image: (shown_time(image) or datetime.min, image.id), reverse=True)
    for k, image in enumerate(ordered, 1):
        pairs = object_pairs(image, options, prxnr=prxnr, thumbnail=thumbnails.get(image.id, ""))
        sections.append((f"MMO{k}", pairs))
    return sections


def export_sections(slots: Iterable[tuple[int, str]], paths: Mapping[str, str]) -> list[Section]:
    """Stage 4's answer: [MMOPATH] MMOIDk=<file> for each exported MMOID, k as in the request; the
    section is there, empty, when nothing was exported (`vdds_exchange.answer` says why)."""
    return [("MMOPATH", [(f"MMOID{k}", paths[ref]) for k, ref in slots if ref in paths])]


def outcome_error(outcome: Outcome, kind: Kind, options: Options, patid: str = "") -> tuple[int, str]:
    """(ERRORLEVEL, ERRORTEXT) for an outcome: 0 and "" when it succeeded, else 1 and a sentence.

    Implementers only use 0 and 1 (the spec's table of levels is not public); the text says what is
    wrong in the receptionist's language, and the technical detail follows in parentheses for IT.
    """
    lang = options.language
    status = outcome.status
    if status.ok:
        return 0, ""
    if status in (Status.PARTIAL, Status.NOT_FOUND) and outcome.missing_refs:
        key = "image_unknown" if kind is Kind.MMOVIEW else "images_missing"
        return 1, message(lang, key, ids=", ".join(outcome.missing_refs))
    if status is Status.NOT_FOUND:
        return 1, message(lang, "patient_unknown", patid=patid)
    if status is Status.CONFLICT:
        text = message(lang, "conflict", patid=patid, conflict=outcome.conflict_id or "?")
        return 1, f"{text} ({outcome.message})"
    if status is Status.INVALID:
        # What the store cannot take (a control character, U+FFFD from a wrong code page, a value longer
        # than its column) is the PVS's data, not a fault of ours: saying "internal error" sent the
        # receptionist to IT for a name typed wrong, and the detail says which field.
        return 1, f"{message(lang, 'invalid')} ({outcome.message})"
    return 1, f"{message(lang, 'internal')} ({outcome.message})"


# --------------------------------------------------------------------------------------------------
# Stage 6: the push file (MMOINFIMPORT) and the PVS's answer to it


def push_bytes(
    *,
    pvs: str,
    from_pvs: str,
    bvs: str,
    prxnr: str,
    patid: str,
    objects: Sequence[Sequence[tuple[str, str]]],
    codepage: str,
) -> bytes:
    """The exchange file of a push ("Table 5": [PATID] without name fields, the PATID is the only key), as
    the PVS's import program reads it: CRLF line ends, no BOM, in `codepage` (`protocols.common.codepage`)."""
    head = [
        ("PVS", pvs),
        ("BVS", bvs),
        ("FROMPVS", from_pvs),
        ("PRXNR", prxnr),
        ("PATID", patid),
        ("ERRORLEVEL", "0"),
        ("ERRORTEXT", ""),
        ("READY", "0"),
    ]
    sections: list[Section] = [("PATID", head), ("MMOS", [("COUNT", str(len(objects)))])]
    sections += [(f"MMO{k}", pairs) for k, pairs in enumerate(objects, 1)]
    text = render_ini((name, [(key, clean(value)) for key, value in pairs]) for name, pairs in sections)
    return DecodedText("", codepage, b"", "\r\n").encode(text)


@dataclass(frozen=True)
class PushReply:
    """What the PVS wrote back into a push file."""

    ready: bool
    errorlevel: str
    errortext: str

    @property
    def accepted(self) -> bool:
        return self.ready and errorlevel_ok(self.errorlevel)


def push_reply(data: bytes, fallback: str = "cp1252") -> PushReply:
    """The handshake in a push file: [PATID] first, else the first section that has READY."""
    sections = parse_ini(decode(data, fallback).text)
    found = sections.get("PATID")
    if found is None or "READY" not in found:
        found = next((s for s in sections.values() if "READY" in s), IniSection(""))
    text = found.get("ERRORTEXT") or found.get("ERROR-TEXT")
    return PushReply(found.get("READY") == "1", found.get("ERRORLEVEL"), text)


# --------------------------------------------------------------------------------------------------
# VDDS_MMI.INI: our [BVS] registration, edited so every other byte stays as it was

PROGRAM_KEYS = ("PATDATIMPORT", "MMOINFEXPORT", "MMOVIEW", "MMOEXPORT")
MMI_ENCODING = "cp1252"  # VDDS_MMI.INI without a BOM (verified on a real Z1 file [C1])
_LINE = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")  # after CRLF, LF or a lone CR: what Windows ends lines at


class RegistryError(ValueError):
    """The registration cannot be written as asked (a value the file's code page cannot hold ...)."""


# `<KEY>_OS`, the platform a registered program runs on: 1 = Windows [C]; gdt2dicom writes 3 on macOS
# and Linux [C1].
OS_WINDOWS = "1"
OS_OTHER = "3"


def os_code(windows: bool) -> str:
    """`<KEY>_OS` for a program registered on Windows or elsewhere."""
    return OS_WINDOWS if windows else OS_OTHER


def registered_stages(stage5: bool) -> str:
    """`STAGES`, the digits of the stages a BVS serves: ours are 1 to 4, and 5 when stage 5 is on."""
    return "1234" + ("5" if stage5 else "")


@dataclass(frozen=True)
class BvsEntry:
    """Our registration: the detail section and what the [BVS] index points at."""

    section: str  # our detail section, e.g. PMSBRIDGE
    name: str  # display name a PVS shows
    command: str  # the module's command line, without spaces in paths; the PVS appends the file
    os_code: str  # os_code(): OS_WINDOWS or OS_OTHER
    install_dir: str
    stages: str  # registered_stages(): e.g. 1234
    version: str  # VDDS-media version

    def pairs(self) -> list[tuple[str, str]]:
        pairs = [("NAME", self.name)]
        for key in PROGRAM_KEYS:
            pairs += [(key, self.command), (f"{key}_OS", self.os_code)]
        pairs += [("PFAD", self.install_dir), ("STAGES", self.stages), ("VERSION", self.version)]
        return pairs


@dataclass(frozen=True)
class MmiText:
    """VDDS_MMI.INI as text, and how to write it back byte for byte: its BOM and its codec.

    The file belongs to every PVS and BVS on the machine, and some write it as UTF-16 or UTF-8 with a
    BOM; an edit in cp1252 would put our lines before the BOM and make every other entry unreadable.
    The error handlers keep bytes the codec does not define (cp1252's five holes, stray UTF-8 bytes) as
    they were, so untouched lines round-trip exactly.
    """

    text: str
    bom: bytes
    codec: str

    @property
    def errors(self) -> str:
        return "surrogatepass" if self.codec.startswith("utf-16") else "surrogateescape"

    def encode(self, text: str) -> bytes:
        return self.bom + text.encode(self.codec, self.errors)


def read_mmi(data: bytes) -> MmiText:
    """VDDS_MMI.INI in its own encoding: a BOM (UTF-8, UTF-16LE/BE), BOM-less UTF-16, else cp1252.

    Raises RegistryError when the bytes do not read back exactly (UTF-16 with an odd byte count, say):
    such a file is refused and left untouched rather than rewritten with damage.
    """
    sniffed = decode(data, MMI_ENCODING)
    codec = "utf-8" if sniffed.encoding == "utf-8-sig" else sniffed.encoding
    body = data[len(sniffed.bom) :]
    mmi = MmiText("", sniffed.bom, codec)
    try:
        text = body.decode(codec, mmi.errors)
        exact = text.encode(codec, mmi.errors) == body
    except UnicodeError:
        exact = False
    if not exact:
        label = f"{codec.upper()}{' with BOM' if sniffed.bom else ''}"
        raise RegistryError(f"the file is not valid {label}: left untouched, edit it by hand")
    return MmiText(text, sniffed.bom, codec)


def _lines(text: str) -> tuple[list[str], str]:
    """The text's lines with their endings, and the line ending new lines get (CRLF unless LF is used)."""
    lines = [line for line in _LINE.split(text) if line]
    newline = "\n" if "\n" in text and "\r\n" not in text else "\r\n"
    return lines, newline


def _classify(line: str) -> tuple[str, str, str]:
    return ini_line(line)


def _new_line(text: str, newline: str, mmi: MmiText) -> str:
    """A line we add, refused when the file's encoding cannot hold it (cp1252 and a CJK name, say)."""
    try:
        text.encode(mmi.codec)
    except UnicodeEncodeError:
        raise RegistryError(f"{text!r} cannot be written in {mmi.codec}") from None
    return text + newline


def _section_spans(lines: Sequence[str]) -> list[tuple[str, int, int]]:
    """(upper-cased name, first line, end line) of every section, in file order."""
    spans: list[tuple[str, int, int]] = []
    for i, line in enumerate(lines):
        kind, name, _value = _classify(line)
        if kind == "section":
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], i)
            spans.append((name.upper(), i, len(lines)))
    return spans


def _ensure_final_newline(lines: list[str], newline: str) -> None:
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += newline


def _end_of_keys(lines: Sequence[str], start: int, end: int) -> int:
    """Where a new key goes in a section: after its last non-blank line."""
    last = start
    for i in range(start + 1, end):
        if lines[i].strip():
            last = i
    return last + 1


def register(data: bytes, entry: BvsEntry) -> bytes:
    """VDDS_MMI.INI with our entry added or updated, in the file's own encoding and BOM; every other
    byte as it was.

    [BVS] gets NAMEk=<our section> with the next free k (the largest k in use plus one: the index need
    not be contiguous) unless some NAMEk already names us; our detail section is replaced in place, or
    appended at the end.
    """
    mmi = read_mmi(data)
    lines, newline = _lines(mmi.text)
    _ensure_final_newline(lines, newline)
    ours = entry.section.upper()
    body = [_new_line(f"[{entry.section}]", newline, mmi)]
    body += [_new_line(f"{key}={value}", newline, mmi) for key, value in entry.pairs()]
    detail = [span for span in _section_spans(lines) if span[0] == ours]
    if detail:
        for _name, start, end in reversed(detail[1:]):  # a duplicate of our section goes
            del lines[start:end]
        _name, start, end = detail[0]
        lines[start:end] = body + lines[_end_of_keys(lines, start, end) : end]  # its blank lines stay
    else:
        if lines and lines[-1].strip():
            lines.append(newline)
        lines += body
    _register_index(lines, newline, entry.section, mmi)
    return mmi.encode("".join(lines))


def _register_index(lines: list[str], newline: str, section: str, mmi: MmiText) -> None:
    """Our NAMEk in the [BVS] index (created at the top when the file has none), in place."""
    index = next((span for span in _section_spans(lines) if span[0] == "BVS"), None)
    if index is None:
        lines[:0] = [_new_line("[BVS]", newline, mmi), _new_line(f"NAME1={section}", newline, mmi), newline]
        return
    _name, start, end = index
    taken: list[int] = []
    for line in lines[start + 1 : end]:
        kind, key, value = _classify(line)
        k = numbered(key, "NAME")
        if kind == "key" and k is not None:
            if value.strip().upper() == section.upper():
                return
            taken.append(k)
    at = _end_of_keys(lines, start, end)
    lines.insert(at, _new_line(f"NAME{max(taken, default=0) + 1}={section}", newline, mmi))


def unregister(data: bytes, section: str) -> bytes:
    """VDDS_MMI.INI without our [BVS] index entry and our detail section, in the file's own encoding;
    every other byte as it was."""
    mmi = read_mmi(data)
    lines, _newline = _lines(mmi.text)
    ours = section.upper()
    spans = _section_spans(lines)
    remove: set[int] = set()
    for name, start, end in spans:
        if name == ours:
            remove.update(range(start, end))
            while end == len(lines) and start > 0 and not lines[start - 1].strip():
                start -= 1  # the blank line register put before a section it appended at the end
                remove.add(start)
        elif name == "BVS":
            for i in range(start + 1, end):
                kind, key, value = _classify(lines[i])
                if kind == "key" and numbered(key, "NAME") is not None and value.strip().upper() == ours:
                    remove.add(i)
    return mmi.encode("".join(line for i, line in enumerate(lines) if i not in remove))


@dataclass(frozen=True)
class PushTarget:
    """Where a push for a PVS goes: the section whose MMOINFIMPORT runs, and that program."""

    section: str
    program: str
    direct_import: bool  # the PVS takes a file copy in the push (DIRECTIMAGEIMPORT)


def push_target(data: bytes, pvs: str) -> PushTarget | None:
    """The MMOINFIMPORT program registered for `pvs`: in its own section, else in the archive section
    its [PVS] index names (ARCHIV=, as CGM registers it); None when the PVS registers none."""
    sections = parse_ini(decode(data, MMI_ENCODING).text)
    own = sections.get(pvs.strip().upper())
    if own is None:
        return None
    candidates = [own]
    archive = sections.get("PVS", IniSection("")).get("ARCHIV").strip().upper()
    if archive and archive in sections:
        candidates.append(sections[archive])
    for section in candidates:
        program = section.get("MMOINFIMPORT").strip()
        if program:
            direct = (section.get("DIRECTIMAGEIMPORT") or own.get("DIRECTIMAGEIMPORT")).strip().upper()
            return PushTarget(section.name, program, direct in _TRUE)
    return None
