"""Typed, validated settings read from the INI file (see `bridge.config_file` for the raw layer).

Every section is a frozen dataclass; every key is a dataclass field whose metadata holds its parser, its
default (as the string a user would write) and its documentation. The same declarations produce the
commented file `pms-bridge init` writes, so the documentation of a key lives in exactly one place.

A bad value or an unknown key stops start-up with one line naming the file, section, key, value and
what is allowed: a practice's IT admin reads it in a service log, often without us on the phone.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from bridge.config_file import (
    DEFAULT_API_HOST,
    DEFAULT_API_PORT,
    DEFAULT_CONFIG_NAME,
    DEFAULT_TLS_CERT,
    ENV_PREFIX,
    ConfigFileError,
    RawConfig,
    config_home,
    find_config_path,
    read_raw,
    resolve_path,
)
from bridge.model import Category
from protocols.common import LOCALE_SHORT_DATES, DateFormatError, dotnet_to_strptime
from protocols.opp import DEFAULT_CLI_FLAGS, FIELDS, parse_flag_map


class ConfigError(Exception):
    """A setting is wrong. The message is one line a user can act on."""


# --------------------------------------------------------------------------------------------------
# Value parsers. Each turns the string from the file into a value, or raises ValueError whose text
# says what is allowed.


@dataclass(frozen=True)
class Parser:
    """Parses one kind of value; `allowed` is shown to the user when a value is refused."""

    allowed: str
    convert: Callable[[str, Path], Any]
    render: Callable[[Any], str] | None = None  # back to the text a config file holds (plain str() if None)

    def __call__(self, text: str, home: Path) -> Any:
        return self.convert(text, home)


_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _bool(text: str, _home: Path) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError


def Bool() -> Parser:
    return Parser("yes or no", _bool)


def Int(low: int, high: int) -> Parser:
    def convert(text: str, _home: Path) -> int:
        value = int(text.strip())
        if not low <= value <= high:
            raise ValueError
        return value

    return Parser(f"a whole number from {low} to {high}", convert)


def Float(low: float, high: float) -> Parser:
    def convert(text: str, _home: Path) -> float:
        value = float(text.strip())
        if not low <= value <= high:
            raise ValueError
        return value

    return Parser(f"a number from {low} to {high}", convert)


def Choice(*choices: str) -> Parser:
    def convert(text: str, _home: Path) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError
        return value

    return Parser(" | ".join(choices), convert)


def Text(*, required: bool = False, max_length: int = 1000) -> Parser:
    def convert(text: str, _home: Path) -> str:
        value = text.strip()
        if (required and not value) or len(value) > max_length:
            raise ValueError
        return value

    return Parser("any text" if not required else "a non-empty text", convert)


def OptionalPath() -> Parser:
    """A file or folder path; relative paths are taken from the config file's folder; empty = unset."""

    def convert(text: str, home: Path) -> Path | None:
        value = text.strip()
        if not value:
            return None
        return _resolve(value, home)

    return Parser("a path (relative paths start at the config file's folder), or empty", convert)


def RequiredPath() -> Parser:
    def convert(text: str, home: Path) -> Path:
        value = text.strip()
        if not value:
            raise ValueError
        return _resolve(value, home)

    return Parser("a path (relative paths start at the config file's folder)", convert)


def PathList() -> Parser:
    """Paths separated by semicolons (a folder's name may hold a comma, a Windows path a colon); relative
    paths start at the config file's folder; empty = none."""

    def convert(text: str, home: Path) -> tuple[Path, ...]:
        return tuple(_resolve(item.strip(), home) for item in text.split(";") if item.strip())

    def render(value: tuple[Path, ...]) -> str:
        return "; ".join(str(path) for path in value)

    return Parser(
        "paths separated by semicolons (relative paths start at the config file's folder), or empty",
        convert,
        render,
    )


def _resolve(value: str, home: Path) -> Path:
    return Path(resolve_path(value, str(home)))


def DatabaseUrl() -> Parser:
    def convert(text: str, home: Path) -> str:
        value = text.strip()
        scheme = value.split(":", 1)[0]
        if not value or "://" not in value or scheme.split("+")[0] not in ("sqlite", "postgresql", "mssql"):
            raise ValueError
        if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            rest = value[len("sqlite:///") :]
            # sqlite:///bridge.db is relative; sqlite:///C:/x.db is absolute on Windows.
            if rest and not Path(rest).is_absolute() and not (len(rest) > 1 and rest[1] == ":"):
                value = "sqlite:///" + (home / rest).as_posix()
        return value

    return Parser("a SQLAlchemy URL: sqlite:///FILE, postgresql+psycopg://..., mssql+pyodbc://...", convert)


def Csv() -> Parser:
    def convert(text: str, _home: Path) -> tuple[str, ...]:
        return tuple(item.strip() for item in text.split(",") if item.strip())

    return Parser("a comma-separated list, or empty", convert)


def Pairs(*names: str, separator: str) -> Parser:
    """`name<separator>value` pairs separated by commas; each name one of `names`, at most once.

    Used for maps a PMS needs configured: the INI key each field is written under ("id=PatientNumber",
    names not public) and per-category texts ("panoramic:OPG").
    """

    def convert(text: str, _home: Path) -> dict[str, str]:
        found: dict[str, str] = {}
        for item in text.split(","):
            if not item.strip():
                continue
            name, sep, value = item.partition(separator)
            name, value = name.strip().lower(), value.strip()
            if not sep or name not in names or not value or name in found:
                raise ValueError
            found[name] = value
        return found

    def render(value: dict[str, str]) -> str:
        return ", ".join(f"{name}{separator}{text}" for name, text in value.items())

    return Parser(
        f"name{separator}value pairs separated by commas; names: {', '.join(names)}", convert, render
    )


def DateFormat() -> Parser:
    """A .NET date format string as the PMS's documentation writes it (MM/dd/yyyy, yyyyMMdd ...)."""

    def convert(text: str, _home: Path) -> str:
        value = text.strip()
        try:
            dotnet_to_strptime(value)
        except DateFormatError:
            raise ValueError from None
        return value

    return Parser("a .NET date format with day, month and year, e.g. MM/dd/yyyy or yyyyMMdd", convert)


def DicomTag() -> Parser:
    """A DICOM attribute named by keyword (PatientID) or by tag (0010,0020); checked against the
    dictionary where it is used, so loading the settings does not import pydicom."""

    def convert(text: str, _home: Path) -> str:
        value = text.strip().strip("()").replace(" ", "")
        group, comma, element = value.partition(",")
        is_tag = comma and all(
            len(p) == 4 and all(c in "0123456789abcdefABCDEF" for c in p) for p in (group, element)
        )
        if not is_tag and not (value[:1].isalpha() and value.isalnum() and value.isascii()):
            raise ValueError
        return value

    return Parser("a DICOM keyword such as PatientID, or a tag such as 0010,0020", convert)


CATEGORY_NAMES = tuple(category.value for category in Category)


def key(default: str, parser: Parser, doc: str) -> Any:
    """Declare one config key: its default as written in the file, its parser, its documentation."""
    return field(metadata={"default": default, "parser": parser, "doc": doc})


# --------------------------------------------------------------------------------------------------
# Sections. Defaults may use {home}, the folder of the config file.


@dataclass(frozen=True)
class StoreSettings:
    """Where patients, images and the audit log live."""

    SECTION: ClassVar[str] = "store"
    url: str = key(
        "sqlite:///{home}/bridge.db",
        DatabaseUrl(),
        "Any SQLAlchemy URL: sqlite:///FILE (embedded default), postgresql+psycopg://user:pw@host/db,"
        " mssql+pyodbc://user:pw@DSN",
    )
    images: Path = key(
        "{home}/images",
        RequiredPath(),
        "Folder of the content-addressed image files (a UNC path for a share)",
    )
    db_threads: int = key(
        "4", Int(1, 64), "Worker threads for database work (the event loop never waits on it)"
    )
    migrate: bool = key(
        "yes",
        Bool(),
        "Bring the schema up to date (Alembic) when the daemon starts; no: a store whose schema is older"
        " is refused (migrate with 'pms-bridge init --home')",
    )
    memo_reads: bool = key(
        "yes",
        Bool(),
        "Answer repeated PMS reads (the same patient opened or listed again) from memory while the store"
        " is unchanged; the database tells every daemon of each change (SQLite, PostgreSQL)",
    )
    min_free_mb: int = key(
        "1024",
        Int(0, 10**9),
        "Free space below which the image folder counts as low: doctor fails, /readyz says low_space"
        " (a full disk refuses imports and acquisitions with 507)",
    )


@dataclass(frozen=True)
class ApiSettings:
    """The REST API listener, which also serves health, metrics and the launch commands."""

    SECTION: ClassVar[str] = "api"
    host: str = key(DEFAULT_API_HOST, Text(required=True), "Listen address; loopback unless the LAN needs it")
    port: int = key(str(DEFAULT_API_PORT), Int(1, 65535), "REST API, health, metrics, viewer page")
    token: str = key(
        "",
        Text(),
        'Clients send "Authorization: Bearer <token>"; empty refuses every request with patient data',
    )
    tls: bool = key("no", Bool(), "Serve HTTPS with tls_cert and tls_key")
    tls_cert: Path | None = key(DEFAULT_TLS_CERT, OptionalPath(), "PEM certificate (self-signed by init)")
    tls_key: Path | None = key("{home}/tls/key.pem", OptionalPath(), "PEM private key")
    max_body_mb: int = key("200", Int(1, 4096), "Largest request body accepted, in MB (image uploads)")


def WebOrigins() -> Parser:
    """Exact web origins (scheme://host[:port], as browsers send them in the Origin header)."""

    def convert(text: str, _home: Path) -> tuple[str, ...]:
        found = []
        for item in (i.strip().rstrip("/").lower() for i in text.split(",")):
            if not item:
                continue
            scheme, sep, rest = item.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest or "*" in rest:
                raise ValueError
            found.append(item)
        return tuple(found)

    return Parser("comma-separated origins like https://pms.example.com or http://localhost:8080", convert)


def OppFlagMap() -> Parser:
    """The OPP command-line flag letters: LETTER=FIELD pairs (protocols.opp.FIELDS)."""

    def convert(text: str, _home: Path) -> str:
        return " ".join(f"{letter}={name}" for letter, name in parse_flag_map(text).items())

    return Parser(f"LETTER=FIELD pairs, one flag carrying reference; fields: {', '.join(FIELDS)}", convert)


@dataclass(frozen=True)
class OppWebSettings:
    """OPP web: the HTTP flavour of the Open Practice Protocol (DTX Studio default port 4435)."""

    SECTION: ClassVar[str] = "opp_web"
    enabled: bool = key("yes", Bool(), "Listen for OPP web requests")
    host: str = key(DEFAULT_API_HOST, Text(required=True), "Listen address")
    port: int = key("4435", Int(1, 65535), "OPP web port (4435 as in DTX Studio Clinic)")
    token: str = key(
        "",
        Text(),
        'Optional: requests must send "Authorization: Bearer <token>". Empty: no token, because a'
        " browser-based PMS cannot keep one secret; the origin and host checks protect it instead",
    )
    cors_origins: tuple[str, ...] = key(
        "", WebOrigins(), "Web origins whose pages may call OPP web (CORS); empty allows no other origin"
    )
    allowed_hosts: tuple[str, ...] = key(
        "",
        Csv(),
        "Host names requests may be addressed to besides loopback and the listen address (a guard"
        " against DNS rebinding); * allows any",
    )
    tls: bool = key("no", Bool(), "Serve OPP web over HTTPS")
    tls_cert: Path | None = key("", OptionalPath(), "PEM certificate; empty: [api] tls_cert")
    tls_key: Path | None = key("", OptionalPath(), "PEM private key; empty: [api] tls_key")
    max_body_kb: int = key("64", Int(1, 4096), "Largest OPP web request body, in KB")
    thumbnail_url_seconds: int = key(
        "3600", Int(60, 604800), "How long the signed thumbnail URLs in VIEW_DATA answers stay valid"
    )


# What a PMS's files without a BOM may be written in, for every protocol's `encoding`: Windows' Western
# ANSI code page, the DOS ones (cp850, cp437: PVSs of DOS descent, docs/vdds.md), Latin-9 and UTF-8.
CODE_PAGES = ("cp1252", "cp850", "cp437", "iso-8859-15", "utf-8")


@dataclass(frozen=True)
class OppSettings:
    """OPP (Open Practice Protocol): the points its public documents leave open (docs/opp.md)."""

    SECTION: ClassVar[str] = "opp"
    software_name: str = key(
        "OPP",
        Text(required=True, max_length=64),
        "PMS system name for messages that name no <software> (the command line never does); it keys"
        " the patients, so a PMS using both forms should name itself the same in both",
    )
    practice_id: str = key("", Text(max_length=64), "Practice id for messages that carry none")
    practice_id_attribute: str = key(
        "practiceId", Text(required=True, max_length=64), "XML attribute carrying the practice id"
    )
    middle_name_attribute: str = key(
        "middleName", Text(required=True, max_length=64), "XML attribute of <patient> with the middle name"
    )
    encoding: str = key(
        "cp1252",
        Choice(*CODE_PAGES),
        "Code page of XML files whose bytes are not in the encoding they declare (or UTF-8)",
    )
    cli_flags: str = key(
        DEFAULT_CLI_FLAGS,
        OppFlagMap(),
        "Command-line flag letters (only -p and -d are documented by OPP; the rest are inferred)",
    )
    cli_case_sensitive: bool = key("no", Bool(), "no: -P means -p and -D means -d")
    cli_command: str = key(
        "update_create",
        Choice("update", "update_create", "acquire", "view", "view_data"),
        "Command of a command line that names none",
    )


@dataclass(frozen=True)
class VddsSettings:
    """VDDS-media exchange files (German/Austrian PMSs)."""

    SECTION: ClassVar[str] = "vdds"
    enabled: bool = key("yes", Bool(), "Answer VDDS-media requests")
    exchange_dir: Path | None = key(
        "", OptionalPath(), "Optional watched folder for PMSs that drop exchange files on a share"
    )
    encoding: str = key(
        "auto",
        Choice("auto", *CODE_PAGES),
        "Exchange files without a BOM; auto = BOM sniff (UTF-8, UTF-16), then UTF-8 when the bytes are"
        " valid UTF-8 with a non-ASCII character, else cp1252 (push files we write: cp1252)",
    )
    poll_seconds: float = key(
        "1", Float(0.05, 60), "How often the exchange folder is scanned (change events only hint)"
    )
    folder_wait_stable: bool = key(
        "no",
        Bool(),
        "yes: answer a dropped file only once its size is stable, even when its handshake keys are"
        " complete (for PVSs that write the handshake before the data)",
    )
    language: str = key("de", Choice("de", "en"), "Language of the ERRORTEXT a receptionist reads")
    require_ready: bool = key(
        "yes",
        Bool(),
        "yes: a request without its READY key is a truncated file and answered with an error;"
        " no: for a PVS that never writes READY=0",
    )
    default_pvs: str = key(
        "VDDS",
        Text(required=True, max_length=100),
        "PMS system of requests without a PVS key (all such PVSs share one patient-id namespace)",
    )
    practice_id_key: str = key(
        "PRXNR", Text(max_length=40), "Request key read as practice id; empty: the PVS sends none"
    )
    export_dir: Path = key(
        "{home}/vdds-export", RequiredPath(), "Where stage-2 thumbnails and stage-4 copies are written"
    )
    export_max_age_hours: float = key(
        "24", Float(0.01, 8760), "Exported files and push files older than this are deleted"
    )
    export_format: str = key(
        "jpg", Choice("jpg", "png", "tif", "dcm"), "Format of MMOEXPORT copies when the request has no EXT"
    )
    export_watermark: bool = key(
        "yes", Bool(), "Stamp the thumbnail watermark on JPG/PNG/TIF copies (never on DCM)"
    )
    thumbnail_key: str = key(
        "THUMBNAIL",
        Text(max_length=40),
        "Key naming the thumbnail file in each [MMOn] (not public in the spec); empty: no thumbnails",
    )
    unknown_patient: str = key(
        "empty",
        Choice("empty", "error"),
        "MMOINFEXPORT for a patient the store does not know: an empty list, or an error",
    )
    stage5: str = key(
        "off",
        Choice("off", "always", "flagged"),
        "Stage 5 (assumed: acquisition request): off; always: every PATDATIMPORT also requests an"
        " acquisition; flagged: only when started with ACQUIRE or the request has stage5_key=1",
    )
    stage5_key: str = key("ACQUIRE", Text(max_length=40), "Request key that flags an acquisition")
    type_names: dict[str, str] = key(
        "",
        Pairs(*CATEGORY_NAMES, separator=":"),
        "TYPE text per image category, overriding the German defaults (e.g. panoramic:OPG)",
    )
    type_numbers: dict[str, str] = key(
        "",
        Pairs(*CATEGORY_NAMES, separator=":"),
        "TYPENR per image category, overriding the defaults (x-rays 1, photo 2, document 10)",
    )
    answer_timeout: float = key(
        "60", Float(1, 110), "Seconds a request may take before it is answered with a timeout error"
    )
    push: bool = key("yes", Bool(), "Push new images to the PVS (stage 6, MMOINFIMPORT)")
    push_dir: Path = key("{home}/vdds-push", RequiredPath(), "Where push exchange files are written")
    push_timeout: float = key("120", Float(1, 3600), "Seconds the PVS's import program gets to set READY=1")
    push_trust_exit_code: bool = key(
        "yes", Bool(), "A push whose program exits 0 without setting READY=1 counts as delivered"
    )
    push_prxnr: str = key("1", Text(max_length=100), "PRXNR of a push when the patient has no practice id")
    push_pvs: str = key(
        "archive",
        Choice("archive", "own"),
        "PVS= of a push file (inferred, not confirmed): archive = the VDDS_MMI.INI section whose"
        " MMOINFIMPORT runs (the archive section, e.g. PVS_ARCHIV); own = the patient's PVS as it"
        " registered (e.g. CGM_Z1, as praxishub writes it)",
    )
    mmi_ini: Path | None = key(
        "", OptionalPath(), "VDDS_MMI.INI; empty: %WINDIR%\\VDDS_MMI.INI, or /etc/vdds/VDDS_MMI.INI elsewhere"
    )
    bvs_section: str = key(
        "PMSBRIDGE", Text(required=True, max_length=40), "Our section name in VDDS_MMI.INI (the BVS key)"
    )
    bvs_name: str = key("pms-bridge", Text(required=True, max_length=80), "Display name a PVS shows")
    version: str = key("1.4", Text(required=True, max_length=10), "VDDS-media version we register")
    module_command: str = key(
        "",
        Text(max_length=500),
        "Command registered for every stage; empty: this installation's pms-bridge with --config",
    )


@dataclass(frozen=True)
class PmsSettings:
    """The DTX Studio Clinic PMS settings, with the same meaning."""

    SECTION: ClassVar[str] = "pms"
    ignore_practice_id: bool = key(
        "no", Bool(), "yes: the same PMS patient id from two practices is one patient"
    )
    update_patient_info: bool = key(
        "yes", Bool(), "yes: demographics sent by the PMS overwrite the stored ones"
    )
    allow_patient_creation: bool = key(
        "yes",
        Bool(),
        "yes: patients may also be created outside a PMS launch (REST POST /patients, import);"
        " no: patients only come from the PMS",
    )
    single_patient_mode: bool = key(
        "no", Bool(), "yes: a viewer opened from the PMS shows only that patient (no patient list)"
    )
    open_patient_in: str = key("home", Choice("home", "clinic"), "Where a PMS-opened patient is shown")
    open_image_as: str = key("preview", Choice("preview", "clinic"), "How a PMS-opened image is shown")


@dataclass(frozen=True)
class ThumbnailSettings:
    """Thumbnails sent to a PMS: always watermarked so they cannot pass for diagnostic images."""

    SECTION: ClassVar[str] = "thumbnails"
    size: int = key("256", Int(32, 2048), "Long edge in pixels")
    watermark: str = key(
        "NOT FOR DIAGNOSIS",
        Text(required=True, max_length=200),
        "Text stamped on every thumbnail sent to a PMS",
    )
    watermark_logo: Path | None = key(
        "", OptionalPath(), "Optional PNG logo stamped beside the text (transparency is kept)"
    )
    watermark_position: str = key(
        "bottom-left",
        Choice("bottom-left", "bottom-right", "top-left", "top-right", "center"),
        "Where the watermark goes on the oriented image",
    )
    watermark_opacity: float = key("0.8", Float(0.2, 1.0), "Opacity of the watermark (1 = opaque)")
    preview_size: int = key(
        "1024", Int(256, 4096), "Long edge of the watermarked preview the viewer and PMS links show"
    )
    quality: int = key("85", Int(50, 95), "JPEG quality of thumbnails and previews")


@dataclass(frozen=True)
class LaunchProfile:
    """What every launch-style PMS profile (Dexis, Dentrix, Eaglesoft, CLINIVIEW) says about its PMS."""

    SECTION: ClassVar[str] = ""
    pms_system: str = key(
        "pms", Text(required=True, max_length=100), "PMS system name its patients are keyed by"
    )
    practice_id: str = key("", Text(max_length=100), "Practice id recorded for its patients (empty: none)")
    id_field: str = key(
        "pms_id",
        Choice("pms_id", "chart_number"),
        "Which id the PMS sends: pms_id = its immutable internal patient id; chart_number = the editable"
        " chart number (set in the PMS's bridge as 'use ChartNum')",
    )
    encoding: str = key(
        "auto",
        Choice("auto", *CODE_PAGES),
        "Files without a BOM (a BOM always wins: UTF-8, UTF-16); auto = UTF-8 when the bytes are valid UTF-8"
        " with a non-ASCII character, else cp1252, as [vdds] encoding (what we write: cp1252)",
    )
    thumbnails: bool = key(
        "no", Bool(), "yes: write a watermarked thumbnail and metadata per new image into thumbnail_dir"
    )
    thumbnail_dir: Path | None = key(
        "",
        OptionalPath(),
        "Folder the PMS reads thumbnails from; one sub-folder per patient, named by the id of id_field",
    )

    def __post_init__(self) -> None:
        if self.thumbnails and self.thumbnail_dir is None:
            raise ConfigError(f"[{self.SECTION}] thumbnails = yes needs thumbnail_dir")


@dataclass(frozen=True)
class DexisSettings(LaunchProfile):
    """Dexis-style launches: classic info file, Dexis Integrator file and SET command (Open Dental ...)."""

    SECTION: ClassVar[str] = "dexis"
    pms_system: str = key(
        "dexis", Text(required=True, max_length=100), "PMS system name its patients are keyed by"
    )
    locale: str = key(
        "en-us",
        Choice(*LOCALE_SHORT_DATES),
        "Short-date locale of the PMS workstations: how the classic info file writes BD (en-us 7/14/1985,"
        " en-ca 14/07/1985, de-de 14.07.1985); a day/month ambiguity is settled by this alone",
    )
    info_file_sx_m: str = key(
        "unknown",
        Choice("unknown", "male"),
        "What SX=M means in the classic info file, whose writers send M for every patient who is not"
        " female: unknown (default) or male",
    )
    integrator_dir: Path | None = key(
        "", OptionalPath(), "Watched folder of Dexis Integrator files Patient_<workstation>.txt (empty: off)"
    )


@dataclass(frozen=True)
class DentrixSettings(DexisSettings):
    """Dentrix G6 (Integrator file and SET command, Dexis dialect) and G7 Smart Image (chart number)."""

    SECTION: ClassVar[str] = "dentrix"
    pms_system: str = key(
        "dentrix", Text(required=True, max_length=100), "PMS system name its patients are keyed by"
    )


@dataclass(frozen=True)
class EaglesoftSettings(LaunchProfile):
    """Eaglesoft: the Patterson Imaging ini the PMS writes before it starts the imaging program."""

    SECTION: ClassVar[str] = "eaglesoft"
    pms_system: str = key(
        "eaglesoft", Text(required=True, max_length=100), "PMS system name its patients are keyed by"
    )
    locale: str = key(
        "en-us", Choice(*LOCALE_SHORT_DATES), "Short-date locale of the PMS workstations (birth date)"
    )
    legacy_id_suffix: int = key(
        "0",
        Int(0, 20),
        "0: the PMS sends whole patient numbers; 5: it sends only their last 5 characters (Patterson"
        " legacy bridge): matched against the ends of known numbers, an ambiguous match is refused",
    )
    ini_section: str = key("Patient", Text(required=True, max_length=100), "Section of the patient fields")
    ini_keys: dict[str, str] = key(
        "id=PatientNumber, first_name=FirstName, middle_name=MiddleInitial, last_name=LastName,"
        " street=Address, city=City, postal_code=Zip, sex=Gender, birth_date=Birthdate",
        Pairs(
            "id",
            "first_name",
            "middle_name",
            "last_name",
            "street",
            "city",
            "postal_code",
            "sex",
            "birth_date",
            separator="=",
        ),
        "INI key of each field (the real names are not public; the SSN is never used)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.legacy_id_suffix and self.id_field == "chart_number":
            raise ConfigError("[eaglesoft] legacy_id_suffix truncates patient numbers, not chart numbers")


@dataclass(frozen=True)
class CliniviewSettings(LaunchProfile):
    """CLINIVIEW: the -ID;FIRST;LAST;SSN;MM/dd/yyyy argument and Cliniview.ini."""

    SECTION: ClassVar[str] = "cliniview"
    pms_system: str = key(
        "cliniview", Text(required=True, max_length=100), "PMS system name its patients are keyed by"
    )
    date_format: str = key("MM/dd/yyyy", DateFormat(), "Birth date in the argument (.NET format)")
    ini_section: str = key("Patient", Text(required=True, max_length=100), "Section of the patient fields")
    ini_keys: dict[str, str] = key(
        "id=PatientID, first_name=FirstName, last_name=LastName, birth_date=BirthDate, sex=Sex",
        Pairs("id", "first_name", "middle_name", "last_name", "birth_date", "sex", separator="="),
        "INI key of each field in Cliniview.ini (the real names are not public; the SSN is never used)",
    )
    ini_date_format: str = key("MM/dd/yyyy", DateFormat(), "Birth date in Cliniview.ini (.NET format)")


@dataclass(frozen=True)
class DaemonSettings:
    """How the daemon runs: logs, stop file, background workers."""

    SECTION: ClassVar[str] = "daemon"
    stop_file: Path = key(
        "{home}/pms-bridge.stop",
        RequiredPath(),
        "Creating this file stops the daemon gracefully (for service wrappers that cannot send Ctrl+C)",
    )
    log_level: str = key("info", Choice("debug", "info", "warning", "error"), "Log level")
    log_format: str = key(
        "json", Choice("json", "text"), "json: one JSON object per line; text: for a console"
    )
    log_file: Path | None = key("", OptionalPath(), "Log to this file as well as to stderr")
    shutdown_timeout: float = key("30", Float(1, 600), "Seconds in-flight requests get to finish on stop")
    outbox_lease: float = key(
        "30",
        Float(1, 3600),
        "Seconds a claim on an outbox message (a push being sent) lasts unless renewed: a daemon renews its"
        " own while it sends; one that ran out (its daemon died) is taken over within 1.5 times this",
    )


@dataclass(frozen=True)
class RecordSettings:
    """Record mode: every PMS message and its answer saved as a replayable case (samples layout)."""

    SECTION: ClassVar[str] = "record"
    dir: Path | None = key("", OptionalPath(), "Folder for recorded sessions; empty = record nothing")
    redact: bool = key(
        "yes",
        Bool(),
        "yes: names, birth dates, ids, addresses and SSNs are replaced by consistent pseudonyms;"
        " no: an unredacted capture, only for the practice's own machine",
    )


@dataclass(frozen=True)
class DicomSettings:
    """DICOM media: importing files and file sets, exporting file sets with a DICOMDIR."""

    SECTION: ClassVar[str] = "dicom"
    pms_system: str = key(
        "dicom",
        Text(required=True, max_length=100),
        "The PMS system whose patient ids the DICOM files carry: imported images join the patients that"
        " PMS knows under that id (set it to the PMS's name, e.g. the VDDS PVS name), and export-dicom"
        " finds --patient under it",
    )
    practice_id: str = key("", Text(max_length=100), "The practice id recorded with that PMS system")
    patient_id_tag: str = key(
        "PatientID",
        DicomTag(),
        "The DICOM attribute holding the PMS patient id (exported files carry the id in PatientID)",
    )
    institution_name: str = key("", Text(max_length=64), "Institution Name written on exported images")
    institution_address: str = key("", Text(max_length=1024), "Institution Address on exported images")
    institution_department: str = key("", Text(max_length=64), "Institution Department Name on exports")
    render_at_import: bool = key(
        "no",
        Bool(),
        "yes: render thumbnails and previews while importing; no: render them on first request (cached)",
    )
    max_file_mb: int = key("1024", Int(1, 65536), "Largest DICOM file (or CT volume) imported, in MB")
    max_upload_mb: int = key("4096", Int(1, 262144), "Largest REST import (files, or a zip unpacked), in MB")
    import_folders: tuple[Path, ...] = key(
        "",
        PathList(),
        "Folders of this machine that POST /api/v1/import may import from by path (a JSON body"
        ' {"paths": [...]}: media the server already has, not sent again); empty: none, such requests'
        " are refused",
    )


SECTIONS: tuple[type[Any], ...] = (
    StoreSettings,
    ApiSettings,
    OppWebSettings,
    OppSettings,
    VddsSettings,
    PmsSettings,
    ThumbnailSettings,
    DaemonSettings,
    DicomSettings,
    RecordSettings,
    DexisSettings,
    DentrixSettings,
    EaglesoftSettings,
    CliniviewSettings,
)


def launch_profiles(settings: Settings) -> dict[str, LaunchProfile]:
    """The launch-style PMS profiles ([dexis], [dentrix], [eaglesoft], [cliniview]) by section name."""
    return {cls.SECTION: getattr(settings, cls.SECTION) for cls in SECTIONS if issubclass(cls, LaunchProfile)}


@dataclass(frozen=True)
class WatchedFolder:
    """A folder a PMS writes into and the daemon polls: the section that configures it (its handler's
    protocol), its watcher's name (`watch:<name>` in /readyz), its key in the config and its path."""

    section: str
    watcher: str
    setting: str
    path: Path


def watched_folders(settings: Settings) -> list[WatchedFolder]:
    """The watched folders, the one list the daemon's watchers, `pms-bridge init`, doctor and replay
    all read (so they cannot disagree): `[vdds] exchange_dir` unless `[vdds] enabled = no` (the daemon
    then answers no VDDS request, so nothing is to be made, checked or watched there), and the
    `integrator_dir` of [dexis] and [dentrix]. The daemon never creates them (bridge.watch); `pms-bridge
    init` creates those inside its home folder (bridge.install)."""
    found = []
    if settings.vdds.enabled and settings.vdds.exchange_dir is not None:
        found.append(WatchedFolder("vdds", "vdds", "[vdds] exchange_dir", settings.vdds.exchange_dir))
    for profile in (settings.dexis, settings.dentrix):
        if profile.integrator_dir is not None:
            found.append(
                WatchedFolder(
                    profile.SECTION,
                    f"{profile.SECTION}-integrator",
                    f"[{profile.SECTION}] integrator_dir",
                    profile.integrator_dir,
                )
            )
    return found


def is_loopback(host: str) -> bool:
    """Whether a listen address is reached from this computer only: `localhost` or a loopback address
    (127.0.0.0/8, ::1). A listen-all address (0.0.0.0, ::) and a host name (which may resolve to a LAN
    address) are not."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(settings: Settings) -> list[str]:
    """What the listen addresses leave open to the network: the API beyond loopback without TLS (its
    token and all patient data readable on the wire), OPP web beyond loopback without a token (anyone
    on the network can open, create and change patients through it). One line each, with the remedy.

    Warnings, not errors: a practice may have reasons (a segregated network, a browser-based PMS on
    several workstations, which cannot keep an OPP web token secret: docs/opp.md); the daemon logs them
    at start and `pms-bridge doctor` shows them as WARN.
    """
    found = []
    api, opp_web = settings.api, settings.opp_web
    if not api.tls and not is_loopback(api.host):
        found.append(
            f"[api] host = {api.host} listens beyond loopback without TLS: the API token and patient data"
            " cross the network unencrypted; set [api] tls = yes (init wrote a certificate) or listen on"
            " 127.0.0.1"
        )
    if opp_web.enabled and not opp_web.token and not is_loopback(opp_web.host):
        found.append(
            f"[opp_web] host = {opp_web.host} listens beyond loopback without a token: any program on the"
            " network can open, create and change patients through OPP web; set [opp_web] token (for PMSs"
            " that can send one) or listen on 127.0.0.1"
        )
    return found


@dataclass(frozen=True)
class Settings:
    """All settings of one daemon, as read from `path`."""

    path: Path
    home: Path
    store: StoreSettings
    api: ApiSettings
    opp_web: OppWebSettings
    opp: OppSettings
    vdds: VddsSettings
    pms: PmsSettings
    thumbnails: ThumbnailSettings
    daemon: DaemonSettings
    dicom: DicomSettings
    record: RecordSettings
    dexis: DexisSettings
    dentrix: DentrixSettings
    eaglesoft: EaglesoftSettings
    cliniview: CliniviewSettings


S = TypeVar("S")


def _parse_section(cls: type[S], values: dict[str, str], path: Path, home: Path) -> S:
    section = cls.SECTION  # type: ignore[attr-defined]
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in values:
        if name not in known:
            raise ConfigError(f"{path}: [{section}] unknown key '{name}' (known keys: {', '.join(known)})")
    kwargs: dict[str, Any] = {}
    for name, fld in known.items():
        parser: Parser = fld.metadata["parser"]
        text = values.get(name, fld.metadata["default"].replace("{home}", home.as_posix()))
        try:
            kwargs[name] = parser(text, home)
        except ValueError:
            env = f"{ENV_PREFIX}{section.upper()}__{name.upper()}"
            source = f" (from environment {env})" if env in os.environ else ""
            raise ConfigError(
                f"{path}: [{section}] {name} = {text!r}{source} is not allowed; allowed: {parser.allowed}"
            ) from None
    return cls(**kwargs)


def settings_from_raw(raw: RawConfig, path: Path) -> Settings:
    """Validate raw INI values into Settings; the first problem raises ConfigError."""
    home = Path(config_home(str(path)))
    by_name = {cls.SECTION: cls for cls in SECTIONS}
    for section in raw:
        if section not in by_name:
            raise ConfigError(f"{path}: unknown section [{section}] (known sections: {', '.join(by_name)})")
    parsed = {name: _parse_section(cls, raw.get(name, {}), path, home) for name, cls in by_name.items()}
    return Settings(path=path, home=home, **parsed)


def init_home_of(settings: Settings) -> Path | None:
    """The folder whose `pms-bridge init --home` reads this config (and so migrates its store), or None
    for a config under another name: init would write a new config and a new store beside it."""
    return settings.path.parent if settings.path.name == DEFAULT_CONFIG_NAME else None


def load_settings(explicit_path: str | None = None) -> Settings:
    """Find, read and validate the config file (see `bridge.config_file.find_config_path`)."""
    path = Path(find_config_path(explicit_path))
    try:
        raw = read_raw(str(path))
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    return settings_from_raw(raw, path)


def default_config_text(home: Path, token: str) -> str:
    """The commented config `pms-bridge init` writes: every key with its default and documentation."""
    lines = [
        "; pms-bridge configuration. Every key can be overridden by the environment variable",
        "; PMS_BRIDGE__<SECTION>__<KEY> (upper case). Relative paths start at this file's folder.",
        "",
    ]
    for cls in SECTIONS:
        lines.append(f"[{cls.SECTION}]")
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"; {doc}")
        for fld in dataclasses.fields(cls):
            default = fld.metadata["default"].replace("{home}", home.as_posix())
            if (cls.SECTION, fld.name) == ("api", "token"):
                default = token
            lines.append(f"; {fld.metadata['doc']}")
            lines.append(f"; allowed: {fld.metadata['parser'].allowed}")
            lines.append(f"{fld.name} = {default}")
        lines.append("")
    return "\n".join(lines)
