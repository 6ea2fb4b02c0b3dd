"""The US launch formats as pure parsers: Dexis info file, Integrator file and SET, Patterson ini, CLINIVIEW.

Every message here is bytes exactly as a Windows PMS writes them (cp1252, CRLF) unless the test is about
another encoding; no database, no daemon.
"""

from __future__ import annotations

import codecs
import unicodedata
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.model import Sex
from protocols import cliniview, dexis, patterson
from protocols.common import (
    FutureDateError,
    decode,
    dotnet_date_formats,
    latest_birth_date,
    locale_formats,
    parse_date,
    parse_dotnet_date,
    parse_key_values,
    parse_sex,
)
from protocols.fields import MessageError, PatientFields, field_id, field_text

EN_US = locale_formats("en-us")
# The daemon's date the parsers check birth dates against: fixed, so no test depends on the clock.
TODAY = date(2026, 12, 5)


def crlf(*lines: str, encoding: str = "cp1252") -> bytes:
    return "".join(line + "\r\n" for line in lines).encode(encoding)


# --------------------------------------------------------------------------------------------------
# protocols.common additions


def test_dotnet_slash_is_the_culture_date_separator_and_the_order_stays() -> None:
    formats = dotnet_date_formats("MM/dd/yyyy")
    assert parse_date("07/14/1985", formats, today=TODAY) == date(1985, 7, 14)
    assert parse_date("07.14.1985", formats, today=TODAY) == date(1985, 7, 14)  # a German workstation
    assert parse_date("07-14-1985", formats, today=TODAY) == date(1985, 7, 14)
    with pytest.raises(ValueError):
        parse_date("14.07.1985", formats, today=TODAY)  # never read day-first
    assert dotnet_date_formats("yyyyMMdd") == ("%Y%m%d",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7/14/45", date(1945, 7, 14)),  # strptime's pivot made this 2045
        ("7/14/24", date(2024, 7, 14)),
        ("12/06/26", date(2026, 12, 6)),  # tomorrow: the day of slack for time zones
        ("12/07/26", date(1926, 12, 7)),  # the day after tomorrow would be in the future
        ("2/29/00", date(2000, 2, 29)),
    ],
)
def test_a_two_digit_year_is_the_latest_century_not_in_the_future(value: str, expected: date) -> None:
    """On 2026-12-05: a birth date is never in the future, so that decides the century (no fixed pivot)."""
    assert parse_date(value, locale_formats("en-us"), today=TODAY) == expected
    assert parse_dotnet_date(value, "M/d/yy", today=TODAY) == expected


@pytest.mark.parametrize("value", ["12/31/2099", "12/07/2026", "1/1/9999"])
def test_a_birth_date_after_tomorrow_is_refused(value: str) -> None:
    """After today and its day of slack for time zones (`latest_birth_date`): refused, never stored."""
    with pytest.raises(FutureDateError, match="is in the future"):
        parse_date(value, locale_formats("en-us"), today=TODAY)
    with pytest.raises(FutureDateError):
        parse_dotnet_date(value, "M/d/yyyy", today=TODAY)
    assert latest_birth_date(TODAY) == date(2026, 12, 6)
    assert parse_date("12/06/2026", locale_formats("en-us"), today=TODAY) == date(2026, 12, 6)


def test_every_us_format_refuses_a_future_birth_date_and_reads_two_digit_years() -> None:
    """Dexis (info file and Integrator), Patterson, CLINIVIEW (argument and ini), each in its own words."""
    info = dexis.parse_file(info_file("7/14/45"), short_date_formats=EN_US, today=TODAY)
    assert info.fields.demographics.birth_date == date(1945, 7, 14)
    with pytest.raises(MessageError, match="BD '20991231' is in the future"):
        dexis.parse_file(
            crlf("PN=77", "LN=Doe", "FN=Jane", "BD=20991231"), short_date_formats=EN_US, today=TODAY
        )
    with pytest.raises(MessageError, match="BD '20991231' is in the future"):
        dexis.parse_set_command('SET 77 LN="Doe" FN="Jane" BD=20991231', today=TODAY)

    def patterson_birth(birth: str) -> date | None:
        data = patterson_ini(birth=birth)
        fields = patterson.parse(
            data, section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY
        )
        return fields.demographics.birth_date

    assert patterson_birth("7/14/45") == date(1945, 7, 14)
    with pytest.raises(MessageError, match="Birthdate '12/31/2099' is in the future"):
        patterson_birth("12/31/2099")
    with pytest.raises(MessageError, match="birth date '12/31/2099' is in the future"):
        cliniview.parse_argument("-0815;Ann;Lee;;12/31/2099", date_formats=CLINIVIEW_DATES, today=TODAY)
    ini = crlf("[Patient]", "PatientID=0815", "FirstName=Ann", "LastName=Lee", "BirthDate=12/31/2099")
    keys = {"id": "PatientID", "first_name": "FirstName", "last_name": "LastName", "birth_date": "BirthDate"}
    with pytest.raises(MessageError, match="BirthDate '12/31/2099' is in the future"):
        cliniview.parse_ini_file(ini, section="Patient", keys=keys, date_formats=CLINIVIEW_DATES, today=TODAY)


@pytest.mark.parametrize("value", ["1/1/0001", "01/01/0001", "01.01.0001", "0001-01-01", "", "  "])
def test_dotnet_min_date_in_any_short_date_means_no_birth_date(value: str) -> None:
    formats = (*locale_formats("en-us"), *locale_formats("de-de"), *locale_formats("en-ca"))
    assert parse_date(value, formats, today=TODAY) is None


@pytest.mark.parametrize(("code", "sex"), [(" ", "U"), ("", "U"), ("M", "M"), ("f", "F"), ("X", "O")])
def test_blank_sex_is_unknown(code: str, sex: str) -> None:
    assert parse_sex(code) == sex


def test_key_values_unquote_one_pair_only_when_asked() -> None:
    text = 'LN="Smith"\r\nFN=""\r\nMI="\r\nX="a"b"\r\n'
    assert parse_key_values(text, unquote=True) == {"LN": "Smith", "FN": "", "MI": '"', "X": 'a"b'}
    assert parse_key_values(text)["LN"] == '"Smith"'


def test_field_limits_name_the_field() -> None:
    with pytest.raises(MessageError, match="LN is longer than 120"):
        field_text("x" * 121, "LN")
    with pytest.raises(MessageError, match="PN contains control characters"):
        field_text("12\x003", "PN")
    with pytest.raises(MessageError, match="PN is empty"):
        field_id("  ", "PN")
    assert field_id(" 0042 ", "PN") == "0042"


# --------------------------------------------------------------------------------------------------
# Dexis classic info file


def info_file(bd: str, sx: str = "F", *, last: str = "Côté", first: str = "Zoë", pn: str = "1042") -> bytes:
    return crlf(
        f"{last}, {first}  {bd}  ({pn})", f"PN={pn}", f"LN={last}", f"FN={first}", f"BD={bd}", f"SX={sx}"
    )


@pytest.mark.parametrize(
    ("locale", "bd", "expected"),
    [
        ("en-us", "7/14/1985", date(1985, 7, 14)),
        ("en-us", "3/4/1990", date(1990, 3, 4)),  # month first: the locale decides, nothing else
        ("en-ca", "03/04/1990", date(1990, 4, 3)),  # day first
        ("en-ca", "1985-07-14", date(1985, 7, 14)),  # newer Windows en-CA short date
        ("de-de", "14.07.1985", date(1985, 7, 14)),
        ("en-us", "1/1/0001", None),  # DateTime.MinValue: the PMS has no birth date
        ("de-de", "01.01.0001", None),
    ],
)
def test_info_file_birth_date_follows_the_configured_locale(
    locale: str, bd: str, expected: date | None
) -> None:
    message = dexis.parse_file(info_file(bd), short_date_formats=locale_formats(locale), today=TODAY)
    assert message.dialect == dexis.INFO_FILE
    assert message.fields.demographics.birth_date == expected


def test_info_file_reads_cp1252_accents_and_keeps_the_id_as_text() -> None:
    message = dexis.parse_file(info_file("7/14/1985", pn="00042"), short_date_formats=EN_US, today=TODAY)
    assert message.fields.patient_id == "00042"
    demo = message.fields.demographics
    assert (demo.last_name, demo.first_name, demo.sex) == ("Côté", "Zoë", Sex.FEMALE)


def test_info_file_with_a_utf16_bom_reads_the_same() -> None:
    text = info_file("7/14/1985").decode("cp1252")
    data = codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    assert (
        dexis.parse_file(data, short_date_formats=EN_US, today=TODAY).fields.demographics.last_name == "Côté"
    )


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_info_file_in_utf16_without_a_bom_starting_outside_latin1_reads_the_same(codec: str) -> None:
    """Ł is 41 01 in UTF-16LE: no NUL in the second byte, so the file was read as cp1252, "truncated"."""
    lines = ("Łukasiewicz, Zoë  7/14/1985  (1042)", "PN=1042", "LN=Łukasiewicz", "FN=Zoë", "BD=7/14/1985")
    data = "".join(f"{line}\r\n" for line in lines)
    decoded = decode(data.encode(codec))
    assert (decoded.encoding, decoded.bom, decoded.text) == (codec, b"", data)
    fields = dexis.parse_file(data.encode(codec), short_date_formats=EN_US, today=TODAY).fields
    assert (fields.patient_id, fields.demographics.last_name) == ("1042", "Łukasiewicz")


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        ("[PATIENT]\r\nPATID=1\r\n".encode("utf-16-le"), "utf-16-le"),  # what the old test caught
        ("ŁŻ\r\nPN=1\r\n".encode("utf-16-le"), "utf-16-le"),
        ("Ł\r\nPN=1".encode("utf-16-be"), "utf-16-be"),
        ("Łukasz Żółw".encode("cp1252", "replace"), "cp1252"),
        ("Łukasz Żółw".encode(), "utf-8"),
        (b"\x00\x00\x00\x00\x00\x00", "utf-8"),  # NULs everywhere say nothing about byte order
        (b"A\x00", "utf-8"),  # one code unit is too little to tell
    ],
)
def test_bomless_utf16_is_told_by_where_most_nuls_are(data: bytes, encoding: str) -> None:
    assert decode(data, "utf-8" if encoding != "cp1252" else "cp1252").encoding == encoding


def test_info_file_date_of_another_locale_is_refused_not_guessed() -> None:
    with pytest.raises(MessageError, match="BD '14/07/1985' is not a date in the configured locale"):
        dexis.parse_file(info_file("14/07/1985"), short_date_formats=EN_US, today=TODAY)


def test_info_file_sx_m_means_not_female_unless_configured() -> None:
    data = info_file("7/14/1985", sx="M")
    assert (
        dexis.parse_file(data, short_date_formats=EN_US, today=TODAY).fields.demographics.sex is Sex.UNKNOWN
    )
    male = dexis.parse_file(data, short_date_formats=EN_US, info_file_male=True, today=TODAY)
    assert male.fields.demographics.sex is Sex.MALE


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (info_file("7/14/1985")[:-3], "truncated or still being written"),
        (info_file("7/14/1985")[:-20], "no BD= line: it is truncated"),  # cut at a line end
        (crlf("PN=77", "LN=Doe"), "no FN= line"),
        (crlf("Smith, John  7/14/1985  (17)", "PN=17"), "no LN= line"),
        (b"", "empty"),
        (b"\r\n\r\n", "empty"),
        (crlf("PN=", "LN=Smith", "FN=John", "MI="), "PN is empty"),
        (b"x" * (dexis.MAX_FILE_BYTES + 1), "at most"),
    ],
)
def test_broken_files_are_refused_with_a_reason(data: bytes, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        dexis.parse_file(data, short_date_formats=EN_US, today=TODAY)


@pytest.mark.parametrize("newline", ["\r", "\n", "\r\n"], ids=["cr", "lf", "crlf"])
def test_dexis_files_with_any_line_end_are_whole_and_cut_ones_are_refused(newline: str) -> None:
    """A Dexis file's last line may end in CR, LF or CRLF, as the Patterson ini's and Cliniview.ini's
    (`last_line_ended`): a CR-only writer's files were refused as "truncated or still being written"."""
    integrator = newline.join(["PN=1042", "LN=Côté", "FN=Zoë", "BD=19850714"]).encode("cp1252")
    info = info_file("7/14/1985").replace(b"\r\n", newline.encode())
    for whole in (integrator + newline.encode(), info):
        fields = dexis.parse_file(whole, short_date_formats=EN_US, today=TODAY).fields
        assert (fields.patient_id, fields.demographics.last_name) == ("1042", "Côté")
        assert fields.demographics.birth_date == date(1985, 7, 14)
    with pytest.raises(MessageError, match="truncated or still being written"):
        dexis.parse_file(
            integrator[:-2], short_date_formats=EN_US, today=TODAY
        )  # BD=198507: cut inside the last line


# --------------------------------------------------------------------------------------------------
# Dexis Integrator file and SET command


def test_integrator_files_are_named_after_their_workstation() -> None:
    assert dexis.integrator_workstation("Patient_OP3.txt") == "OP3"
    assert dexis.integrator_workstation("PATIENT_ws 1.TXT") == "ws 1"  # Windows names have no case
    for other in ("Patient_.txt", "Patient_OP3.txt.tmp", ".Patient_OP3.txt.tmp", "Info.txt"):
        assert dexis.integrator_workstation(other) is None, other


def test_integrator_file_with_quotes_middle_initial_and_leading_zeros() -> None:
    data = crlf("PN=000123456789", 'LN="O\'Brien-Søgaard"', 'FN="Zoë"', "MI=J", "BD=19850714", "SX=M")
    message = dexis.parse_file(data, short_date_formats=EN_US, today=TODAY)
    assert message.dialect == dexis.INTEGRATOR
    demo = message.fields.demographics
    assert message.fields.patient_id == "000123456789"
    assert (demo.last_name, demo.first_name, demo.middle_name) == ("O'Brien-Søgaard", "Zoë", "J")
    assert (demo.birth_date, demo.sex) == (date(1985, 7, 14), Sex.MALE)  # SX=M is male here


def test_integrator_file_without_sx_and_bd_is_unknown_and_undated() -> None:
    message = dexis.parse_file(
        crlf("PN=77", "LN=Doe", "FN=Jane", "MI="), short_date_formats=EN_US, today=TODAY
    )
    assert message.fields.demographics.sex is Sex.UNKNOWN
    assert message.fields.demographics.birth_date is None


def test_integrator_birth_date_is_always_yyyymmdd_whatever_the_locale() -> None:
    with pytest.raises(MessageError, match="yyyyMMdd"):
        dexis.parse_file(
            crlf("PN=77", "LN=Doe", "FN=Jane", "MI=", "BD=7/14/1985"), short_date_formats=EN_US, today=TODAY
        )


@pytest.mark.parametrize(
    "command",
    [
        'SET 4711 LN="García Márquez" FN="José" MI="" BD=19700102',
        "SET 4711 LN=García Márquez FN=José MI= BD=19700102",  # quotes removed by a shell
        ' set  4711   LN="García Márquez"  FN="José" BD=19700102 ',
        'SET "4711" LN="García Márquez" FN="José" BD=19700102',
    ],
)
def test_set_command_quoted_or_not(command: str) -> None:
    fields = dexis.parse_set_command(command, today=TODAY)
    assert fields.patient_id == "4711"
    demo = fields.demographics
    assert (demo.last_name, demo.first_name, demo.birth_date) == ("García Márquez", "José", date(1970, 1, 2))
    assert demo.sex is Sex.UNKNOWN


def test_set_command_carries_a_chart_number_beside_the_id() -> None:
    fields = dexis.parse_set_command('SET 1001 CN="SMIJO0" LN="Smith" FN="John"', today=TODAY)
    assert (fields.patient_id, fields.chart_number) == ("1001", "SMIJO0")


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("SET", "PN is empty"),
        ("SETX 1 LN=a", "not a SET command"),
        ("SET 17 garbage LN=Smith", "unexpected text"),
        ('SET "17 LN=Smith', "no closing quote"),
        ("SET 17 LN=Smith FN=Ann BD=1985-07-14", "yyyyMMdd"),
        ('SET LN="Smith" FN="Ann" BD=19850714', "no patient id: 'LN=\"Smith\"' is a key"),
        ("SET LN=Smith FN=Ann BD=19850714", "no patient id: 'LN=Smith' is a key"),
        ('SET 4713 LN="Smit', "LN has an unbalanced quote: the SET command is truncated"),
        ('SET 4720 LN="Smith" FN="An', "FN has an unbalanced quote: the SET command is truncated"),
        ('SET 4720 LN="Smith" FN="Ann" MI="', "MI has an unbalanced quote"),
        ("SET 4716", "no LN=: it is truncated"),
        ('SET 4716 LN="Smith"', "no FN=: it is truncated"),
        ("SET 17 LN=" + "x" * 1100, "longer than"),
    ],
)
def test_bad_set_commands_are_refused_with_a_reason(command: str, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        dexis.parse_set_command(command, today=TODAY)


def assert_served_as_read(fields: PatientFields) -> None:
    """What any message that parses gives: an id (stripped, at most 60 characters) and text fields
    without control characters, stripped, within the store's lengths."""
    assert fields.patient_id and len(fields.patient_id) <= 60
    names = fields.demographics
    for value in (
        fields.patient_id,
        fields.chart_number,
        names.last_name,
        names.first_name,
        names.middle_name,
    ):
        assert value == value.strip() and len(value) <= 120
        assert not any(unicodedata.category(ch) == "Cc" for ch in value), value


def assert_one_line_reason(exc: MessageError) -> None:
    """A refusal is one line the PMS's user can act on."""
    reason = str(exc)
    assert reason and "\n" not in reason and "\r" not in reason, reason


# Messages near the format: the required keys and some others in any order, values that may be quoted,
# empty, odd or cut, and any line end, so that the properties below meet messages that parse as well as
# ones that do not.
_DEXIS_VALUES = st.one_of(
    st.from_regex(r'"?[A-Za-zé ]{0,12}"?', fullmatch=True),
    st.sampled_from(["19850714", "7/14/1985"]),
    st.text(max_size=12),
)
_DEXIS_IDS = st.one_of(st.from_regex(r"[0-9A-Z]{1,8}", fullmatch=True), st.text(max_size=10))


def _pairs(keys: list[str], values: list[str]) -> list[str]:
    return [f"{key}={value}" for key, value in zip(keys, values, strict=False)]


_DEXIS_KEYS = st.lists(st.sampled_from(["MI", "BD", "SX", "CN", "LN"]), max_size=3, unique=True).flatmap(
    lambda extra: st.permutations(["LN", "FN", *extra])  # LN twice at times: the first one counts
)
_DEXIS_PAIRS = st.builds(_pairs, _DEXIS_KEYS, st.lists(_DEXIS_VALUES, min_size=5, max_size=5))
NEAR_SET_COMMANDS = st.builds(lambda id_, pairs: " ".join(["SET", id_, *pairs]), _DEXIS_IDS, _DEXIS_PAIRS)
NEAR_DEXIS_FILES = st.builds(
    lambda first, id_, pairs, end: ("\r\n".join([*first, f"PN={id_}", *pairs]) + end).encode(
        "cp1252", errors="replace"
    ),
    st.lists(st.text(max_size=30), max_size=1),
    _DEXIS_IDS,
    _DEXIS_PAIRS,
    st.sampled_from(["\r\n", "\n", ""]),
)


@given(st.one_of(st.text(max_size=300), NEAR_SET_COMMANDS))
def test_set_parser_answers_any_text_with_fields_or_a_message_error(text: str) -> None:
    try:
        fields = dexis.parse_set_command(text, today=TODAY)
    except MessageError as exc:
        assert_one_line_reason(exc)
    else:
        assert_served_as_read(fields)
        assert text.lstrip()[:3].upper() == "SET" and fields.patient_id in text


@given(st.one_of(st.binary(max_size=400), NEAR_DEXIS_FILES))
def test_file_parser_answers_any_bytes_with_fields_or_a_message_error(data: bytes) -> None:
    try:
        message = dexis.parse_file(data, short_date_formats=EN_US, today=TODAY)
    except MessageError as exc:
        assert_one_line_reason(exc)
    else:
        assert_served_as_read(message.fields)
        assert message.dialect in (dexis.INFO_FILE, dexis.INTEGRATOR)
        assert data.endswith((b"\n", b"\r"))  # a file cut inside a line is never read


# --------------------------------------------------------------------------------------------------
# Patterson ini

PATTERSON_KEYS = {
    "id": "PatientNumber",
    "first_name": "FirstName",
    "middle_name": "MiddleInitial",
    "last_name": "LastName",
    "street": "Address",
    "city": "City",
    "postal_code": "Zip",
    "sex": "Gender",
    "birth_date": "Birthdate",
}


def patterson_ini(gender: str = "F", birth: str = "7/14/1985", number: str = "00817") -> bytes:
    return crlf(
        "[Patient]",
        "FirstName=Zoë",
        "MiddleInitial=",
        "LastName=Brontë, Jr.",
        "PreferredName=",
        "Address=12 Rue Saint-Honoré",
        "City=Montréal",
        "State=QC",
        "Zip=H2X 1Y4",
        "SSN=123456789",
        f"Gender={gender}",
        f"Birthdate={birth}",
        f"PatientNumber={number}",
        "ProviderNumber=001",
    )


def test_patterson_ini_fields_and_never_the_ssn() -> None:
    fields = patterson.parse(
        patterson_ini(), section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY
    )
    assert fields.patient_id == "00817"
    demo = fields.demographics
    assert (demo.last_name, demo.first_name, demo.city, demo.postal_code) == (
        "Brontë, Jr.",
        "Zoë",
        "Montréal",
        "H2X 1Y4",
    )
    assert (demo.birth_date, demo.sex) == (date(1985, 7, 14), Sex.FEMALE)
    assert "123456789" not in repr(fields)
    assert "123456789" in fields.sensitive  # only so that record mode keeps it out of captures


@pytest.mark.parametrize("gender", [" ", ""])
def test_patterson_space_gender_is_unknown_and_min_date_is_no_birth_date(gender: str) -> None:
    data = patterson_ini(gender=gender, birth="1/1/0001")
    fields = patterson.parse(
        data, section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY
    )
    assert fields.demographics.sex is Sex.UNKNOWN
    assert fields.demographics.birth_date is None


def test_patterson_wrong_section_names_what_it_found() -> None:
    with pytest.raises(MessageError, match=r"no \[Launch\] section \(found: \[Patient\]\)"):
        patterson.parse(
            patterson_ini(), section="Launch", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY
        )


def test_patterson_birth_date_of_another_locale_or_an_oversized_ini_is_refused() -> None:
    with pytest.raises(
        MessageError, match=r"Birthdate '17\.01\.1980' is not a date in the configured format"
    ):
        patterson.parse(
            patterson_ini(birth="17.01.1980"),
            section="Patient",
            keys=PATTERSON_KEYS,
            short_date_formats=EN_US,
            today=TODAY,
        )
    with pytest.raises(MessageError, match="at most 65536 are read"):
        patterson.parse(
            b" " * 70000, section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY
        )


def test_patterson_truncated_ini_without_the_number_is_refused() -> None:
    data = patterson_ini().split(b"PatientNumber")[0]
    with pytest.raises(MessageError, match="no PatientNumber key"):
        patterson.parse(data, section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY)


FULL_PATTERSON = crlf(
    "[Patient]", "PatientNumber=1042", "FirstName=Ann", "LastName=Other", "Gender=F", "Birthdate=2/2/1990"
)


@pytest.mark.parametrize(
    "data",
    [
        FULL_PATTERSON[:27],  # "PatientNumber=10": another patient's number
        FULL_PATTERSON[: FULL_PATTERSON.index(b"Ann") + 1],  # "FirstName=A"
        FULL_PATTERSON[:-6],  # "Birthdate=2/2/" : no year
        FULL_PATTERSON.decode().encode("utf-16-le")[:-3],  # UTF-16 cut inside a character
    ],
)
def test_patterson_ini_cut_inside_a_line_is_refused_as_truncated(data: bytes) -> None:
    with pytest.raises(MessageError, match="the ini ends in the middle of a line: it is truncated"):
        patterson.parse(data, section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY)


@pytest.mark.parametrize("cut_after", ["PatientNumber", "FirstName"])
def test_patterson_ini_cut_at_a_line_end_before_a_name_is_refused(cut_after: str) -> None:
    data = FULL_PATTERSON[: FULL_PATTERSON.index(b"\r\n", FULL_PATTERSON.index(cut_after.encode())) + 2]
    with pytest.raises(MessageError, match=r"the ini has no LastName key in \[Patient\]: it is truncated"):
        patterson.parse(data, section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY)
    # A site whose PMS writes no name keys maps none, and is not refused for them.
    keys = {k: v for k, v in PATTERSON_KEYS.items() if k not in ("first_name", "last_name")}
    assert (
        patterson.parse(data, section="Patient", keys=keys, short_date_formats=EN_US, today=TODAY).patient_id
        == "1042"
    )


def test_patterson_ini_cut_between_cr_and_lf_or_with_a_blank_last_line_is_whole() -> None:
    """CR alone ends a line (as GetPrivateProfileString reads it), so no value of these is cut short."""
    for data in (FULL_PATTERSON[:-1], FULL_PATTERSON + b"  ", FULL_PATTERSON.replace(b"\r\n", b"\n")):
        fields = patterson.parse(
            data, section="Patient", keys=PATTERSON_KEYS, short_date_formats=EN_US, today=TODAY
        )
        assert (fields.patient_id, fields.demographics.birth_date) == ("1042", date(1990, 2, 2))


# --------------------------------------------------------------------------------------------------
# CLINIVIEW

CLINIVIEW_DATES = dotnet_date_formats("MM/dd/yyyy")


def test_cliniview_argument_with_stripped_names_and_no_ssn_kept() -> None:
    fields = cliniview.parse_argument(
        "-0815;MaryAnn;VanDerBerg;123456789;03/02/1975", date_formats=CLINIVIEW_DATES, today=TODAY
    )
    assert fields.patient_id == "0815"
    demo = fields.demographics
    assert (demo.first_name, demo.last_name, demo.birth_date) == ("MaryAnn", "VanDerBerg", date(1975, 3, 2))
    assert demo.sex is Sex.UNKNOWN  # the argument has no sex field
    assert "123456789" not in repr(fields)
    assert fields.sensitive == ("123456789",)  # only so that record mode keeps it out of captures


@pytest.mark.parametrize(
    ("argument", "birth"),
    [
        ("-7;John;Doe;;01/01/0001", None),
        ("-7;John;Doe;000000000;", None),
        ("-7;John;Doe;;07.14.1985", date(1985, 7, 14)),  # a German workstation's separator
    ],
)
def test_cliniview_birth_dates(argument: str, birth: date | None) -> None:
    assert (
        cliniview.parse_argument(argument, date_formats=CLINIVIEW_DATES, today=TODAY).demographics.birth_date
        == birth
    )


@pytest.mark.parametrize(
    ("argument", "problem"),
    [
        ("-7;John;Doe", "got 3: the argument is truncated"),
        ("-7;John;Doe;;01/01/1980;x", "got 6"),
        ("7;John;Doe;;01/01/1980", "expected one argument"),
        ("-;John;Doe;;01/01/1980", "patient id is empty"),
        ("-7;John;Doe;;14/07/1985", "birth date '14/07/1985'"),
    ],
)
def test_bad_cliniview_arguments_are_refused_with_a_reason(argument: str, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        cliniview.parse_argument(argument, date_formats=CLINIVIEW_DATES, today=TODAY)


def test_cliniview_ini_with_configured_names() -> None:
    data = crlf("[PatientData]", "Id=0042", "First=Hélène", "Last=Gagné", "Born=1985-07-14", "Sex=F", "SSN=1")
    keys = {"id": "Id", "first_name": "First", "last_name": "Last", "birth_date": "Born", "sex": "Sex"}
    fields = cliniview.parse_ini_file(
        data, section="patientdata", keys=keys, date_formats=dotnet_date_formats("yyyy-MM-dd"), today=TODAY
    )
    demo = fields.demographics
    assert (fields.patient_id, demo.last_name, demo.first_name) == ("0042", "Gagné", "Hélène")
    assert (demo.birth_date, demo.sex) == (date(1985, 7, 14), Sex.FEMALE)


@pytest.mark.parametrize(
    "cut", [b"[Patient]\r\nPatientID=10", b"[Patient]\r\nPatientID=1042\r\nFirstName=Zo"]
)
def test_cliniview_ini_cut_inside_a_line_is_refused_as_truncated(cut: bytes) -> None:
    keys = {"id": "PatientID", "first_name": "FirstName", "last_name": "LastName"}
    with pytest.raises(MessageError, match=r"Cliniview\.ini ends in the middle of a line: it is truncated"):
        cliniview.parse_ini_file(cut, section="Patient", keys=keys, date_formats=CLINIVIEW_DATES, today=TODAY)
