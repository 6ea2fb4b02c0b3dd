"""The VDDS-media exchange file itself: how it is read, recognised and answered.

Split from `protocols.vdds` so that the answer the launch client writes when the daemon is down
(`unreachable_answer`) costs almost nothing to import: this module needs only the standard library and
`protocols.common`, no dataclasses and no `bridge.model`. Everything a request means (patients, images,
exports, the push, the registry) is in `protocols.vdds`, which builds on this.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from protocols.common import (
    AUTO,
    DecodedText,
    IniSection,
    decode,
    ini_line,
    one_line,
    parse_ini,
    render_ini,
    split_lines,
)

# --------------------------------------------------------------------------------------------------
# Vocabulary


class Kind(enum.StrEnum):
    """Which request an exchange file is, named by the VDDS_MMI.INI key of the program it calls."""

    PATDATIMPORT = "PATDATIMPORT"  # stage 1: [PATIENT], hand over a patient
    MMOINFEXPORT = "MMOINFEXPORT"  # stage 2: [PATID], list the patient's objects
    MMOVIEW = "MMOVIEW"  # stage 3: command line MMOID, show one object
    MMOEXPORT = "MMOEXPORT"  # stage 4: [MMOIDS], export file copies
    MMOINFIMPORT = "MMOINFIMPORT"  # stage 6: our own push into the PVS (never a request to us)
    AMBIGUOUS = "AMBIGUOUS"  # several unanswered requests in one file: none is served
    UNKNOWN = "UNKNOWN"


class FolderState(enum.Enum):
    """What a file in the watched exchange folder is."""

    COMPLETE = "complete"  # a request with its handshake keys: answer it now
    INCOMPLETE = "incomplete"  # a request that may still be being written: answer once it is stable
    ANSWERED = "answered"  # READY=1: done (by us or anyone)
    FOREIGN = "foreign"  # not a VDDS request (a thumbnail, a push file, an empty file)


HANDSHAKE_KEYS = frozenset({"READY", "ERRORLEVEL", "ERRORTEXT", "ERROR-TEXT"})


def errorlevel_ok(value: str) -> bool:
    """Whether an ERRORLEVEL value reports success: 0, or empty (a file that never set the key reported no
    error). One reading for the answers we find already given and for the PVS's answer to a push; spaces
    around it do not count, as Windows' GetPrivateProfileInt ignores them."""
    return value.strip() in ("", "0")


# The sections a PVS writes a request into, in the priority that picks among answered ones.
REQUEST_SECTIONS = ("MMOIDS", "PATIENT", "PATID")
FALLBACK_SECTION = "PATIENT"  # where the handshake goes when a file has no section at all
ERRORTEXT_LIMIT = 250  # PVSs show it in a message box and read it into fixed buffers

# Field -> accepted keys, first present wins. The German variants are what defensive parsers accept
# because Z1 may send them (praxishub); BIRTHDATE likewise.
DEMOGRAPHIC_KEYS: dict[str, tuple[str, ...]] = {
    "last_name": ("LASTNAME", "NAME", "NACHNAME"),
    "first_name": ("FIRSTNAME", "VORNAME"),
    "title": ("TITLE", "TITEL"),
    "birth_date": ("BIRTHDAY", "GEBDATUM", "BIRTHDATE", "GEBURTSDATUM"),
    "sex": ("SEX", "GESCHLECHT"),
    "street": ("STREET", "STRASSE", "STRAßE"),
    "city": ("CITY", "ORT"),
    "postal_code": ("ZIP", "PLZ"),
    "phone": ("HOMEPHONE", "TELEFON", "PHONE", "CELLULAR"),
    "email": ("EMAIL",),
}

# The answer texts a receptionist reads (ERRORTEXT), per configured language.
TEXTS: dict[str, dict[str, str]] = {
    "de": {
        "unreachable": "Die Bildverwaltung (pms-bridge) ist nicht erreichbar oder hat die Anfrage abgelehnt. "
        "Bitte den Dienst pms-bridge prüfen oder die IT informieren.",
        "unknown_request": "Unbekannte Anfrage: die Übergabedatei enthält keinen Abschnitt [PATIENT], "
        "[PATID] oder [MMOIDS].",
        "no_request": "Es wurde weder eine Übergabedatei noch eine Bildnummer übergeben.",
        "no_patid": "Die Patientennummer (PATID) fehlt in der Übergabedatei.",
        "incomplete": "Die Übergabedatei ist unvollständig (READY fehlt). Bitte die Anfrage wiederholen.",
        "ambiguous": "Die Übergabedatei enthält mehrere unbeantwortete Anfragen ({sections}); keine wurde "
        "ausgeführt. Bitte die Anfrage wiederholen.",
        "too_large": "Die Übergabedatei ist zu groß ({size} Bytes, höchstens {limit}); sie wurde nicht "
        "ausgeführt.",
        "bad_date": "Das Geburtsdatum {value!r} ist ungültig (erwartet JJJJMMTT oder TT.MM.JJJJ).",
        "future_date": "Das Geburtsdatum {value!r} liegt in der Zukunft.",
        "too_long": "Der Wert von {key} ist zu lang (höchstens {limit} Zeichen).",
        "no_mmoids": "Die Anfrage nennt keine Bildnummern (MMOID).",
        "too_many": "Die Anfrage nennt {count} Bilder; höchstens {limit} sind erlaubt.",
        "bad_format": "Das Exportformat {value!r} wird nicht unterstützt (JPG, PNG, TIF oder DCM).",
        "conflict": "Patient {patid}: die übermittelten Daten passen nicht zu den gespeicherten; nichts "
        "wurde geändert. Bitte die Stammdaten prüfen (Konflikt Nr. {conflict}).",
        "patient_unknown": "Patient {patid} ist in der Bildverwaltung nicht bekannt.",
        "images_missing": "Bilder nicht gefunden: {ids}.",
        "image_unknown": "Bild {ids} nicht gefunden.",
        "export_failed": "Bilder konnten nicht exportiert werden: {ids}.",
        "disabled": "Die VDDS-Schnittstelle ist in pms-bridge ausgeschaltet.",
        "timeout": "Die Bildverwaltung hat nicht rechtzeitig geantwortet. Bitte erneut versuchen.",
        "invalid": "Die übermittelten Daten sind ungültig; nichts wurde geändert.",
        "internal": "Interner Fehler in der Bildverwaltung. Bitte die IT informieren.",
        "store_lost": "Die Bildverwaltung kann zurzeit nichts speichern (ihre Datenbank fehlt). Bitte die "
        "IT informieren.",
    },
    "en": {
        "unreachable": "The imaging service (pms-bridge) cannot be reached or refused the request. Please "
        "check the pms-bridge service or call IT.",
        "unknown_request": "Unknown request: the exchange file has no [PATIENT], [PATID] or [MMOIDS] "
        "section.",
        "no_request": "Neither an exchange file nor an image number was passed.",
        "no_patid": "The patient number (PATID) is missing from the exchange file.",
        "incomplete": "The exchange file is incomplete (READY is missing). Please send the request again.",
        "ambiguous": "The exchange file holds several unanswered requests ({sections}); none was carried "
        "out. Please send the request again.",
        "too_large": "The exchange file is too large ({size} bytes, at most {limit}); it was not carried "
        "out.",
        "bad_date": "The birth date {value!r} is not valid (expected YYYYMMDD or DD.MM.YYYY).",
        "future_date": "The birth date {value!r} is in the future.",
        "too_long": "The value of {key} is too long (at most {limit} characters).",
        "no_mmoids": "The request names no image numbers (MMOID).",
        "too_many": "The request names {count} images; at most {limit} are allowed.",
        "bad_format": "The export format {value!r} is not supported (JPG, PNG, TIF or DCM).",
        "conflict": "Patient {patid}: the data sent do not match the stored patient; nothing was changed. "
        "Please check the patient's details (conflict no. {conflict}).",
        "patient_unknown": "Patient {patid} is not known to the imaging system.",
        "images_missing": "Images not found: {ids}.",
        "image_unknown": "Image {ids} not found.",
        "export_failed": "Images could not be exported: {ids}.",
        "disabled": "The VDDS interface is switched off in pms-bridge.",
        "timeout": "The imaging system did not answer in time. Please try again.",
        "invalid": "The data sent are not valid; nothing was changed.",
        "internal": "Internal error in the imaging system. Please call IT.",
        "store_lost": "The imaging system cannot save anything at the moment (its database is missing). "
        "Please call IT.",
    },
}


def message(language: str, code: str, **values: object) -> str:
    """The answer text `code` in `language` (German when the language is unknown)."""
    texts = TEXTS.get(language, TEXTS["de"])
    return texts[code].format(**values)


def read_codepage(setting: str) -> str:
    """How an exchange file without a BOM is read (`decode`'s fallback): `[vdds] encoding`, where auto
    means AUTO, UTF-8 when the bytes are UTF-8 with a non-ASCII character, else cp1252. The answer is
    written in what was read, so a BOM-less UTF-8 request gets a BOM-less UTF-8 answer."""
    value = setting.strip().lower()
    return AUTO if value in ("", AUTO) else value


# --------------------------------------------------------------------------------------------------
# Reading an exchange file


class Exchange:
    """One exchange file as read: its text (and how to write it back), sections, kind, main section.

    `targets` are the sections the answer's handshake goes into: the request section, or every
    unanswered request section when the file is AMBIGUOUS (the PVS polls the one it wrote, which we
    cannot tell). A plain class, not a dataclass: the dataclasses module costs the daemon-down answer
    10 ms.
    """

    __slots__ = ("decoded", "fallback", "kind", "main", "sections", "targets")

    def __init__(
        self,
        decoded: DecodedText,
        sections: dict[str, IniSection],
        kind: Kind,
        main: str,
        fallback: str,
        targets: tuple[str, ...] = (),
    ) -> None:
        self.decoded = decoded
        self.sections = sections
        self.kind = kind
        self.main = main  # the request section's name as written; "" when the file has no section
        self.fallback = fallback
        self.targets = targets or ((main,) if main else ())

    @property
    def request(self) -> IniSection | None:
        return self.sections.get(self.main.upper()) if self.main else None

    @property
    def answered(self) -> bool:
        """READY=1 in the request section: the file holds no unanswered request (detect prefers those)."""
        request = self.request
        return request is not None and request.get("READY") == "1"


def read_exchange(data: bytes, fallback: str = "cp1252") -> Exchange:
    """Read an exchange file; never fails (unreadable bytes become U+FFFD and an UNKNOWN request)."""
    decoded = decode(data, fallback)
    sections = parse_ini(decoded.text)
    kind, main, targets = detect(sections)
    return Exchange(decoded, sections, kind, main, fallback, targets)


def _request_kind(key: str, section: IniSection) -> Kind:
    """What a request section asks for: [MMOIDS] stage 4, [PATIENT] stage 1, [PATID] stage 1 with
    demographics (a variant some PVSs write), our own push file with FROMPVS, else stage 2."""
    if key == "MMOIDS":
        return Kind.MMOEXPORT
    if key == "PATIENT":
        return Kind.PATDATIMPORT
    if "FROMPVS" in section:
        return Kind.MMOINFIMPORT
    if any(k in section for keys in DEMOGRAPHIC_KEYS.values() for k in keys):
        return Kind.PATDATIMPORT
    return Kind.MMOINFEXPORT


def _unanswered(section: IniSection) -> bool:
    return section.get("READY") != "1"


def detect(sections: Mapping[str, IniSection]) -> tuple[Kind, str, tuple[str, ...]]:
    """(kind, request section, sections the answer goes into) of a file, from its sections (never from
    its name: PVSs pass .tmp files).

    The request is the request section ([MMOIDS], [PATIENT], [PATID]) whose READY is not 1: PVSs that
    write with WritePrivateProfileString reuse their file and leave the sections of earlier, answered
    requests in it, and serving one of those again would show the previous patient. Several unanswered
    request sections are AMBIGUOUS (which one the PVS wrote last cannot be told from the content), and
    are all answered with an error rather than guessed at. When every request section is answered, the
    first in the order [MMOIDS], [PATIENT], [PATID] is the (answered) request. [PATID] with FROMPVS is
    our own stage-6 push file, not a request. A file without any request section is UNKNOWN, answered in
    its first unanswered section that has a handshake key.
    """
    found = [
        (_request_kind(key, sections[key]), sections[key]) for key in REQUEST_SECTIONS if key in sections
    ]
    requests = [(kind, section) for kind, section in found if kind is not Kind.MMOINFIMPORT]
    if requests:
        pending = [(kind, section) for kind, section in requests if _unanswered(section)]
        if len(pending) > 1:
            names = tuple(section.name for _kind, section in pending)
            return Kind.AMBIGUOUS, names[0], names
        kind, section = (pending or requests)[0]
        return kind, section.name, (section.name,)
    if found:
        return Kind.MMOINFIMPORT, found[0][1].name, (found[0][1].name,)
    named = [section for key, section in sections.items() if key]
    with_handshake = [s for s in named if any(k in s for k in HANDSHAKE_KEYS)]
    pending_unknown = [s for s in with_handshake if _unanswered(s)]
    main = (pending_unknown or with_handshake or named or [IniSection("")])[0].name
    return Kind.UNKNOWN, main, ((main,) if main else ())


def folder_state(data: bytes, fallback: str = "cp1252") -> FolderState:
    """What a file in the watched folder is: a complete request, one still being written, done, or not ours.

    A request is complete when its section holds all three handshake keys (READY, ERRORLEVEL and
    ERRORTEXT, as PVSs write them after the data); a request without them is answered only once its size
    has been stable. A file with several unanswered requests is refused, but only once it has been
    stable (a PVS may be half way through writing its new request). An unknown section counts as a
    request only when it has a READY key. Answered sections of a reused file are history (`detect`).
    """
    exchange = read_exchange(data, fallback)
    request = exchange.request
    if request is None or exchange.kind is Kind.MMOINFIMPORT:
        return FolderState.FOREIGN
    if exchange.answered:
        return FolderState.ANSWERED
    if exchange.kind is Kind.AMBIGUOUS:
        return FolderState.INCOMPLETE
    if exchange.kind is Kind.UNKNOWN:
        return FolderState.INCOMPLETE if "READY" in request else FolderState.FOREIGN
    has_text = "ERRORTEXT" in request or "ERROR-TEXT" in request
    if "READY" in request and "ERRORLEVEL" in request and has_text:
        return FolderState.COMPLETE
    return FolderState.INCOMPLETE


def numbered(key: str, prefix: str) -> int | None:
    """k of a numbered key or section name such as MMOID3, NAME12 or MMO1; None for anything else."""
    upper = key.upper()
    suffix = upper[len(prefix) :]
    return int(suffix) if upper.startswith(prefix) and suffix.isascii() and suffix.isdigit() else None


# --------------------------------------------------------------------------------------------------
# Answers

Section = tuple[str, Sequence[tuple[str, str]]]


def _is_answer_section(name: str) -> bool:
    """[MMOS], [MMOPATH] and [MMOn]: what a stage-2 or stage-4 answer adds to the request file."""
    return name.upper() in ("MMOS", "MMOPATH") or numbered(name, "MMO") is not None


def answer(exchange: Exchange, errorlevel: int, errortext: str, sections: Sequence[Section] = ()) -> bytes:
    """The answered exchange file, in the encoding, BOM and line endings it arrived in.

    The PVS's own lines stay as they were; only the handshake keys of the request section (of every
    unanswered request section when the file is AMBIGUOUS) are replaced (ERRORLEVEL, ERRORTEXT - and
    ERROR-TEXT when the PVS used that spelling - then READY=1 as the last key) and the answer sections of
    an earlier answer are replaced by `sections` (a stage-4 answer always gets its [MMOPATH]). Answered
    request sections of a reused file keep their bytes. The caller writes the result atomically, so the
    PVS never sees READY=1 before the rest of the answer.
    """
    targets = exchange.targets or (FALLBACK_SECTION,)
    handshake = _handshake(exchange, errorlevel, errortext)
    sections = _required_sections(exchange, sections)
    drop = {name.upper() for name, _pairs in sections}
    if exchange.kind in (Kind.MMOINFEXPORT, Kind.MMOEXPORT):
        drop |= {key for key in exchange.sections if key and _is_answer_section(key)}
    drop -= {name.upper() for name in targets}
    head = _edit(exchange.decoded.text, targets, handshake, drop)
    tail = render_ini((name, [(key, clean(value)) for key, value in pairs]) for name, pairs in sections)
    if tail and not head.endswith("\n\n"):
        head += "\n"
    data = exchange.decoded.encode(head + tail)
    if all(_ready_in(data, name, exchange.fallback) for name in targets):
        return data
    # The edited text did not read back (a BOM-less UTF-16 file whose first characters changed, say):
    # fall back to a file that only holds the answer, which always reads back.
    return _bare(exchange, targets, handshake, sections)


def _required_sections(exchange: Exchange, sections: Sequence[Section]) -> Sequence[Section]:
    """`sections` with the sections a request's answer always has: stage 4's [MMOPATH] [C], empty when
    nothing was exported (an error, unknown ids, an unsupported EXT, the daemon down). gdt2dicom, the
    confirmed PVS-side reader, only logs a non-zero ERRORLEVEL and then takes [MMOPATH] with `expect`:
    it panics on an answer without the section."""
    if exchange.kind is Kind.MMOEXPORT and not any(name.upper() == "MMOPATH" for name, _pairs in sections):
        return [*sections, ("MMOPATH", ())]
    return sections


def _bare(
    exchange: Exchange, targets: Sequence[str], handshake: list[tuple[str, str]], sections: Sequence[Section]
) -> bytes:
    """A file holding only the answer: what is written when the edited file does not read back."""
    names = [
        name if name.isascii() and name.isprintable() and "]" not in name else FALLBACK_SECTION
        for name in targets
    ]
    return exchange.decoded.encode(
        render_ini([*((name, handshake) for name in dict.fromkeys(names)), *sections])
    )


def _handshake(exchange: Exchange, errorlevel: int, errortext: str) -> list[tuple[str, str]]:
    """ERRORLEVEL, the text in the spelling(s) the answered sections use, READY=1 last."""
    text = clean(errortext)[:ERRORTEXT_LIMIT]
    found = [
        exchange.sections[name.upper()] for name in exchange.targets if name.upper() in exchange.sections
    ]
    pairs = [("ERRORLEVEL", str(errorlevel))]
    if not found or any("ERRORTEXT" in s or "ERROR-TEXT" not in s for s in found):
        pairs.append(("ERRORTEXT", text))
    if any("ERROR-TEXT" in s for s in found):
        pairs.append(("ERROR-TEXT", text))
    pairs.append(("READY", "1"))
    return pairs


def clean(value: str) -> str:
    """A value written into an INI line: one line, no control characters."""
    return "".join(c if c.isprintable() else " " for c in one_line(value))


def _edit(text: str, targets: Sequence[str], handshake: Sequence[tuple[str, str]], drop: set[str]) -> str:
    """`text` with the handshake keys of the `targets` sections replaced and the `drop` sections removed."""
    wanted = {name.upper() for name in targets}
    out: list[str] = []
    current = ""
    placed: set[str] = set()

    def place() -> None:
        trailing: list[str] = []
        while out and not out[-1].strip():
            trailing.append(out.pop())
        out.extend(f"{key}={value}" for key, value in handshake)
        out.extend(trailing)
        placed.add(current)

    for raw in split_lines(text):  # the lines parse_ini sees: a PATID=Z6696672\x0b999 line stays one line
        kind, name, _value = ini_line(raw)
        if kind == "section":
            if current in wanted and current not in placed:
                place()
            current = name.upper()
        if current in drop or (current in wanted and kind == "key" and name.upper() in HANDSHAKE_KEYS):
            continue
        out.append(raw)
    if current in wanted and current not in placed:
        place()
    body = "\n".join(out) + "\n" if out else ""
    missing = [name for name in targets if name.upper() not in placed]
    if missing:
        body += ("\n" if body and not body.endswith("\n\n") else "") + render_ini(
            (name, handshake) for name in missing
        )
    return body


def _ready_in(data: bytes, section: str, fallback: str) -> bool:
    found = parse_ini(decode(data, fallback).text).get(section.upper())
    return found is not None and found.get("READY") == "1"


def whole_lines(head: bytes, fallback: str = "cp1252") -> bytes:
    """The first bytes of a file cut after its last complete line, in the file's encoding.

    For a file too large to read whole: the cut never splits a line, a UTF-8 sequence or a UTF-16 code
    unit, so the bytes after it can be copied unchanged behind an edited head. Empty (or only the BOM)
    when the head holds no line end.
    """
    decoded = decode(head[:4], fallback)
    start = len(decoded.bom)
    if decoded.encoding.startswith("utf-16"):
        unit = b"\n\x00" if decoded.encoding == "utf-16-le" else b"\x00\n"
        at = head.rfind(unit, start)
        while at != -1 and (at - start) % 2:
            at = head.rfind(unit, start, at + 1)
        return head[: at + 2] if at != -1 else head[:start]
    at = head.rfind(b"\n", start)
    return head[: at + 1] if at != -1 else head[:start]


def too_large_answer(head: bytes, size: int, limit: int, language: str, fallback: str) -> tuple[bytes, int]:
    """The answer for a file larger than `limit`, from its first bytes `head`: (new head, n).

    The file becomes the new head followed by the original bytes from offset n on, unchanged: only the
    request section's handshake keys within the head are replaced (ERRORLEVEL=1, the ERRORTEXT in
    `language`, READY=1), in the encoding sniffed from the head. Windows' GetPrivateProfileString reads
    the first occurrence of a key, so a READY=0 the section may still hold beyond the head does not count.
    """
    cut = whole_lines(head, fallback)
    exchange = read_exchange(cut, fallback)
    targets = exchange.targets or (FALLBACK_SECTION,)
    text = message(language, "too_large", size=size, limit=limit)
    handshake = _handshake(exchange, 1, text)
    data = exchange.decoded.encode(_edit(exchange.decoded.text, targets, handshake, set()))
    if not all(_ready_in(data, name, fallback) for name in targets):
        data = _bare(exchange, targets, handshake, ())
    return data, len(cut)


def too_large_file_answer(
    head: bytes, size: int, limit: int, settings: Mapping[str, str]
) -> tuple[bytes, int]:
    """The launch client's answer to an exchange file of `size` bytes over `limit`, from its first bytes
    `head` and the raw `[vdds]` settings: `too_large_answer`, as the watched folder answers it. The launch
    client writes it with `bridge.atomic.rewrite_head`."""
    language = settings.get("language", "de").strip().lower()
    return too_large_answer(head, size, limit, language, read_codepage(settings.get("encoding", AUTO)))


def unreachable_answer(content: bytes, detail: str, settings: Mapping[str, str]) -> bytes:
    """The answer the launch client writes when the daemon cannot answer (`[vdds]` raw settings).

    ERRORLEVEL=1, a sentence in the configured language and the technical reason, READY=1, in the
    encoding the file arrived in.
    """
    language = settings.get("language", "de").strip().lower()
    exchange = read_exchange(content, read_codepage(settings.get("encoding", AUTO)))
    return answer(exchange, 1, f"{message(language, 'unreachable')} ({detail})")
