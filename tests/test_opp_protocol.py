"""protocols.opp without a store: the XML form, the flags, the parameters, the answer, the hostile inputs."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lxml import etree

from bridge.handlers.opp import FIELD_LIMITS
from bridge.model import (
    Action,
    Category,
    ImageView,
    Origin,
    Outcome,
    PatientView,
    Sex,
    Status,
)
from bridge.store.limits import TEXT_RULES
from protocols.common import DateFormatError, dotnet_to_strptime
from protocols.opp import (
    COMMAND_ACTIONS,
    Command,
    OppError,
    OppOptions,
    form_params,
    from_fields,
    parse_args,
    parse_flag_map,
    parse_params,
    parse_xml,
    render_json,
    render_xml,
    split_flags,
)

# The store's limits, as the daemon hands them to the parser (bridge.handlers.opp.options).
OPTIONS = OppOptions(field_limits=FIELD_LIMITS)
# The daemon's date the parsers check birth dates against: fixed, so no test depends on the clock.
TODAY = date(2026, 12, 5)
ERROR_KINDS = {
    "invalid-message",
    "unsupported-version",
    "unknown-command",
    "missing-reference",
    "field-too-long",
    "invalid-field",
    "invalid-date-format",
    "invalid-date",
    "invalid-flag",
    "too-large",
    "not-xml",
    "not-opp",
    "forbidden-dtd",
}
ORIGIN = Origin(protocol="opp", transport="cli", workstation="WS1")

# The envelope gdt2dicom writes for DTX Studio (src/opp_xml.rs), with a patient.
GDT2DICOM = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<opp version="1.2">\n'
    b'    <command type="UPDATE_CREATE" silent="NO"/>\n'
    b'    <software name="gdt2dicom" version="0.1.0"/>\n'
    b'    <patient reference="000815" firstName="J\xc3\xbcrgen" lastName="O&apos;Brien" '
    b'birthdate="1985-07-14" gender="MALE"/>\n</opp>\n'
)


def opp_xml(
    *,
    version: str = "1.3",
    command: str = "UPDATE_CREATE",
    silent: str = "NO",
    software: str = 'name="PMS" version="1"',
    patient: str = 'reference="42" firstName="Eva" lastName="Meier" birthdate="1990-01-03" gender="FEMALE"',
    decl: str = '<?xml version="1.0" encoding="UTF-8"?>',
    extra: str = "",
) -> str:
    return (
        f'{decl}\n<opp version="{version}"><command type="{command}" silent="{silent}"/>'
        f"<software {software}/><patient {patient}/>{extra}</opp>\n"
    )


# --------------------------------------------------------------------------------------------------
# XML


def test_the_gdt2dicom_envelope_becomes_a_patient_request() -> None:
    message = parse_xml(GDT2DICOM, OPTIONS, today=TODAY)
    request = message.request(ORIGIN)
    assert (message.version, message.command, message.silent) == ("1.2", Command.UPDATE_CREATE, False)
    assert (request.pms_system, request.pms_id, request.practice_id) == ("gdt2dicom", "000815", "")
    assert request.action is Action.OPEN
    demo = request.demographics
    assert (demo.first_name, demo.last_name, demo.birth_date, demo.sex) == (
        "Jürgen",
        "O'Brien",
        date(1985, 7, 14),
        Sex.MALE,
    )
    assert message.software_version == "0.1.0"


@pytest.mark.parametrize(
    ("command", "action"),
    [
        ("UPDATE", Action.UPDATE),
        ("UPDATE_CREATE", Action.OPEN),
        ("ACQUIRE", Action.ACQUIRE),
        ("VIEW", Action.OPEN),
        ("VIEW_DATA", Action.LIST_IMAGES),
        ("view_data", Action.LIST_IMAGES),
    ],
)
def test_each_command_maps_onto_its_action(command: str, action: Action) -> None:
    message = parse_xml(opp_xml(command=command).encode(), OPTIONS, today=TODAY)
    assert message.request(ORIGIN).action is action
    assert COMMAND_ACTIONS[message.command] is action


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2", "1.3", "1.3.4"])
def test_versions_1_0_to_1_3_are_accepted(version: str) -> None:
    assert parse_xml(opp_xml(version=version).encode(), OPTIONS, today=TODAY).version == version


@pytest.mark.parametrize("version", ["0.9", "1.4", "2.0", "", "1", "1.3-beta", "1.10"])
def test_other_versions_are_refused_with_the_reason(version: str) -> None:
    with pytest.raises(OppError, match="is not supported") as err:
        parse_xml(opp_xml(version=version).encode(), OPTIONS, today=TODAY)
    assert err.value.kind == "unsupported-version"


def test_a_missing_version_is_refused() -> None:
    data = opp_xml().replace(' version="1.3"', "", 1).replace('<?xml  encoding="UTF-8"?>', "")
    with pytest.raises(OppError, match="no version attribute"):
        parse_xml(data.encode(), OPTIONS, today=TODAY)


def test_an_unknown_command_is_refused_with_the_known_ones() -> None:
    with pytest.raises(OppError, match=r"unknown OPP command 'OPEN' \(known: UPDATE, UPDATE_CREATE") as err:
        parse_xml(opp_xml(command="OPEN").encode(), OPTIONS, today=TODAY)
    assert err.value.kind == "unknown-command"


@pytest.mark.parametrize(
    ("gender", "sex"),
    [
        ("MALE", Sex.MALE),
        ("FEMALE", Sex.FEMALE),
        ("female", Sex.FEMALE),
        ("OTHER", Sex.UNKNOWN),
        ("M", Sex.UNKNOWN),
    ],
)
def test_gender_words_male_and_female_anything_else_unknown(gender: str, sex: Sex) -> None:
    patient = f'reference="1" lastName="X" gender="{gender}"'
    assert parse_xml(opp_xml(patient=patient).encode(), OPTIONS, today=TODAY).demographics.sex is sex


@pytest.mark.parametrize(("silent", "expected"), [("YES", True), ("yes", True), ("NO", False), ("", False)])
def test_silent_yes_or_no(silent: str, expected: bool) -> None:
    assert parse_xml(opp_xml(silent=silent).encode(), OPTIONS, today=TODAY).request(ORIGIN).silent is expected


def test_silent_must_be_yes_or_no() -> None:
    with pytest.raises(OppError, match="silent must be YES or NO"):
        parse_xml(opp_xml(silent="TRUE").encode(), OPTIONS, today=TODAY)


def test_middle_name_and_practice_id_attributes_are_configurable() -> None:
    patient = 'reference="7" lastName="Roe" middleName="Ann" zweitname="Lou" praxis="P9"'
    default = parse_xml(opp_xml(patient=patient).encode(), OPTIONS, today=TODAY)
    assert (default.demographics.middle_name, default.practice_id) == ("Ann", "")
    custom = replace(OPTIONS, middle_name_attribute="zweitname", practice_id_attribute="praxis")
    message = parse_xml(opp_xml(patient=patient).encode(), custom, today=TODAY)
    assert (message.demographics.middle_name, message.practice_id) == ("Lou", "P9")


def test_practice_id_on_the_patient_wins_over_the_software_one() -> None:
    xml = opp_xml(software='name="PMS" practiceId="S"', patient='reference="1" practiceId="P"')
    assert parse_xml(xml.encode(), OPTIONS, today=TODAY).practice_id == "P"
    xml = opp_xml(software='name="PMS" practiceId="S"', patient='reference="1"')
    assert parse_xml(xml.encode(), OPTIONS, today=TODAY).practice_id == "S"


def test_without_software_the_configured_name_and_practice_are_used() -> None:
    xml = opp_xml().replace('<software name="PMS" version="1"/>', "")
    message = parse_xml(
        xml.encode(), replace(OPTIONS, software_name="Site-PMS", practice_id="HQ"), today=TODAY
    )
    assert (message.software, message.practice_id) == ("Site-PMS", "HQ")


def test_data_elements_are_counted_not_interpreted() -> None:
    xml = opp_xml(command="UPDATE", extra='<data key="a" value="1"/><data>free text</data>')
    message = parse_xml(xml.encode(), OPTIONS, today=TODAY)
    assert message.data_elements == 2
    assert message.request(ORIGIN).demographics.last_name == "Meier"


def test_leading_zeros_and_letters_in_the_reference_are_kept() -> None:
    message = parse_xml(opp_xml(patient='reference=" 00A42 " lastName="X"').encode(), OPTIONS, today=TODAY)
    assert message.reference == "00A42"


def test_a_missing_birthdate_or_an_all_zero_one_is_no_date() -> None:
    assert (
        parse_xml(opp_xml(patient='reference="1"').encode(), OPTIONS, today=TODAY).demographics.birth_date
        is None
    )
    zero = opp_xml(patient='reference="1" birthdate="0000-00-00"')
    assert parse_xml(zero.encode(), OPTIONS, today=TODAY).demographics.birth_date is None


def test_a_birthdate_in_the_future_is_an_invalid_date() -> None:
    """After today (2026-12-05) and its day of slack: refused as invalid-date (400 / exit 2), never
    stored; the command line's -d formats too."""
    for value in ("2099-12-31", "2026-12-07"):
        with pytest.raises(OppError, match=f"birthdate '{value}' is in the future") as refused:
            parse_xml(opp_xml(patient=f'reference="1" birthdate="{value}"').encode(), OPTIONS, today=TODAY)
        assert refused.value.kind == "invalid-date"
    with pytest.raises(OppError, match=r"birthdate '31\.12\.2099' is in the future"):
        parse_args(["-p", "1", "-d", "dd.MM.yyyy", "-b", "31.12.2099"], OPTIONS, today=TODAY)
    tomorrow = parse_xml(
        opp_xml(patient='reference="1" birthdate="2026-12-06"').encode(), OPTIONS, today=TODAY
    )
    assert tomorrow.demographics.birth_date == date(2026, 12, 6)


def test_the_xml_birthdate_is_iso_only() -> None:
    with pytest.raises(OppError, match=r"birthdate '14\.07\.1985' does not match yyyy-MM-dd"):
        parse_xml(opp_xml(patient='reference="1" birthdate="14.07.1985"').encode(), OPTIONS, today=TODAY)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "the message is empty"),
        (b"[PATIENT]\r\nPATID=1\r\n", "not well-formed XML"),
        (GDT2DICOM[:120], "not well-formed XML"),
        (b'<vdds version="1.2"/>', "the root element is <vdds>, not <opp>"),
        (b'<opp version="1.2"><patient reference="1"/></opp>', "has no <command> element"),
        (b'<opp version="1.2"><command type="VIEW"/></opp>', "has no <patient> element"),
        (
            b'<opp version="1.2"><command type="VIEW"/>'
            b'<patient reference="1"/><patient reference="2"/></opp>',
            "has 2 <patient> elements, not one",
        ),
        (b'<opp version="1.2"><command type="VIEW"/><patient lastName="X"/></opp>', "no patient reference"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data: bytes, match: str) -> None:
    with pytest.raises(OppError, match=match):
        parse_xml(data, OPTIONS, today=TODAY)


XXE = (
    '<?xml version="1.0"?><!DOCTYPE opp [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    '<opp version="1.2"><command type="VIEW"/><patient reference="1" lastName="&xxe;"/></opp>'
)
EXTERNAL_DTD = (
    '<?xml version="1.0"?><!DOCTYPE opp SYSTEM "http://127.0.0.1:9/opp.dtd">'
    '<opp version="1.2"><command type="VIEW"/><patient reference="1"/></opp>'
)
BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    + ']><opp version="1.2"><command type="VIEW"/><patient reference="1" lastName="&lol9;"/></opp>'
)
PARAMETER_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE opp [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/x.dtd"> %remote;]>'
    '<opp version="1.2"><command type="VIEW"/><patient reference="1"/></opp>'
)


@pytest.mark.parametrize("text", [XXE, EXTERNAL_DTD, BOMB, PARAMETER_ENTITY])
@pytest.mark.parametrize("codec", ["utf-8", "utf-16"])
def test_dtds_entities_and_bombs_are_refused_before_parsing(text: str, codec: str) -> None:
    with pytest.raises(OppError, match="DTDs and entity declarations are not accepted") as err:
        parse_xml(text.encode(codec), OPTIONS, today=TODAY)
    assert err.value.kind == "forbidden-dtd"


def test_a_message_over_the_size_limit_is_refused() -> None:
    big = opp_xml(patient=f'reference="1" lastName="{"x" * 70_000}"').encode()
    with pytest.raises(OppError, match="at most 65536 bytes") as err:
        parse_xml(big, OPTIONS, today=TODAY)
    assert err.value.kind == "too-large"


def test_a_field_over_its_limit_is_refused() -> None:
    with pytest.raises(OppError, match="lastName is longer than 120 characters"):
        parse_xml(opp_xml(patient=f'reference="1" lastName="{"x" * 121}"').encode(), OPTIONS, today=TODAY)
    with pytest.raises(OppError, match="softwareVersion is longer than 200 characters"):
        parse_xml(opp_xml(software=f'name="P" version="{"9" * 201}"').encode(), OPTIONS, today=TODAY)


@pytest.mark.parametrize(
    ("data", "last_name"),
    [
        (opp_xml(patient='reference="1" lastName="Müller"').encode("utf-8"), "Müller"),
        (b"\xef\xbb\xbf" + opp_xml(patient='reference="1" lastName="Müller"').encode("utf-8"), "Müller"),
        (
            b"\xff\xfe"
            + opp_xml(decl='<?xml version="1.0" encoding="UTF-16"?>', patient='reference="1" lastName="Żak"')
            .replace("\n", "\r\n")
            .encode("utf-16-le"),
            "Żak",
        ),
        (
            b"\xfe\xff"
            + opp_xml(
                decl='<?xml version="1.0" encoding="UTF-16"?>', patient='reference="1" lastName="Żak"'
            ).encode("utf-16-be"),
            "Żak",
        ),
        (
            opp_xml(
                decl='<?xml version="1.0" encoding="windows-1252"?>', patient='reference="1" lastName="Groß"'
            ).encode("cp1252"),
            "Groß",
        ),
        (
            opp_xml(
                decl='<?xml version="1.0" encoding="ISO-8859-1"?>', patient='reference="1" lastName="Jäger"'
            ).encode("latin-1"),
            "Jäger",
        ),
        # Declared UTF-8, written in cp1252: read with the [opp] encoding code page.
        (opp_xml(patient='reference="1" lastName="Jörg Jäger"').encode("cp1252"), "Jörg Jäger"),
        # No declaration at all, UTF-8.
        (opp_xml(decl="", patient='reference="1" lastName="Ærø"').encode("utf-8"), "Ærø"),
    ],
)
def test_encodings_windows_pmss_write(data: bytes, last_name: str) -> None:
    assert parse_xml(data, OPTIONS, today=TODAY).demographics.last_name == last_name


def test_the_fallback_code_page_is_configurable() -> None:
    data = opp_xml(patient='reference="1" lastName="Müller"').encode("cp850")
    assert parse_xml(data, replace(OPTIONS, encoding="cp850"), today=TODAY).demographics.last_name == "Müller"


def test_an_unknown_declared_encoding_is_refused() -> None:
    with pytest.raises(OppError, match="unknown encoding 'klingon-8' in the XML declaration"):
        parse_xml(opp_xml(decl='<?xml version="1.0" encoding="klingon-8"?>').encode(), OPTIONS, today=TODAY)


@pytest.mark.parametrize("extra", ["", " "])  # an even and an odd byte count
def test_a_utf8_document_declaring_utf16_without_a_bom_is_read_as_utf8(extra: str) -> None:
    """.NET's StringWriter declares utf-16 on text that is then written as UTF-8."""
    text = opp_xml(decl='<?xml version="1.0" encoding="utf-16"?>', patient='reference="1" lastName="Müller"')
    data = (text + extra).encode("utf-8")
    assert parse_xml(data, OPTIONS, today=TODAY).demographics.last_name == "Müller"


@pytest.mark.parametrize(
    ("encoding", "patient"),
    [
        ("undefined", 'reference="E1"'),
        ("punycode", 'reference="E2"'),
        ("utf-7", 'reference="E3" lastName="+2AA-"'),  # a lone surrogate
        ("unicode_escape", 'reference="E4\\u0030"'),  # was read as reference "E40"
        ("raw_unicode_escape", 'reference="E5"'),
        ("idna", 'reference="E6"'),
        ("rot13", 'reference="E7"'),
        ("base64", 'reference="E8"'),
    ],
)
def test_encodings_that_are_no_text_encoding_are_refused(encoding: str, patient: str) -> None:
    data = opp_xml(decl=f'<?xml version="1.0" encoding="{encoding}"?>', patient=patient).encode()
    with pytest.raises(OppError, match=f"'{encoding}' is not a text encoding OPP accepts") as err:
        parse_xml(data, OPTIONS, today=TODAY)
    assert err.value.kind == "not-xml"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_a_message_or_an_opp_error(data: bytes) -> None:
    try:
        message = parse_xml(data, OPTIONS, today=TODAY)
    except OppError as exc:
        assert exc.kind in ERROR_KINDS and str(exc)
    else:
        assert message.reference and message.command in Command


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200).filter(lambda t: "<!" not in t))
def test_any_attribute_text_round_trips_through_escaping(name: str) -> None:
    """What an XML writer escapes for a name comes back as the name (control characters become spaces)."""
    root = etree.Element("opp", version="1.3")
    etree.SubElement(root, "command", type="VIEW")
    try:
        etree.SubElement(root, "patient", reference="1", lastName=name)
        writable = True
    except ValueError:  # lxml refuses characters XML cannot hold; no PMS can send those either
        writable = False
    assume(writable)
    message = parse_xml(etree.tostring(root, encoding="UTF-8"), OPTIONS, today=TODAY)
    expected = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in name).strip()
    assert message.demographics.last_name == expected


# --------------------------------------------------------------------------------------------------
# Command line


def test_flags_build_the_same_message_as_the_xml() -> None:
    args = [
        "-c",
        "UPDATE_CREATE",
        "-p",
        "000815",
        "-f",
        "Jürgen",
        "-l",
        "O'Brien",
        "-b",
        "1985-07-14",
        "-g",
        "MALE",
    ]
    message = parse_args(args, OPTIONS, today=TODAY)
    from_xml = parse_xml(GDT2DICOM, replace(OPTIONS, software_name="gdt2dicom"), today=TODAY)
    assert message.request(ORIGIN).demographics == from_xml.request(ORIGIN).demographics
    assert (message.reference, message.software, message.version) == ("000815", "OPP", "1.3")


def test_without_c_the_configured_command_is_used() -> None:
    assert parse_args(["-p", "1"], OPTIONS, today=TODAY).command is Command.UPDATE_CREATE
    assert (
        parse_args(["-p", "1"], replace(OPTIONS, cli_command=Command.VIEW), today=TODAY).command
        is Command.VIEW
    )


def test_upper_case_flags_mean_the_lower_case_ones_unless_case_sensitive() -> None:
    assert parse_args(["-P", "9", "-L", "Roe"], OPTIONS, today=TODAY).reference == "9"
    strict = replace(OPTIONS, cli_case_sensitive=True)
    with pytest.raises(OppError, match="unknown flag -P"):
        parse_args(["-P", "9"], strict, today=TODAY)
    both = replace(strict, cli_flags={**OPTIONS.cli_flags, "P": "practiceId"})
    message = parse_args(["-p", "9", "-P", "HQ"], both, today=TODAY)
    assert (message.reference, message.practice_id) == ("9", "HQ")


def test_attached_values_and_values_starting_with_a_dash() -> None:
    message = parse_args(["-p0815", "-l", "-Strich", "-fAnna"], OPTIONS, today=TODAY)
    assert (message.reference, message.demographics.last_name, message.demographics.first_name) == (
        "0815",
        "-Strich",
        "Anna",
    )


def test_the_flag_grammar_is_one_ascii_letter_after_a_dash() -> None:
    """`split_flags` is the one reading of the grammar (the parser's and record mode's): a flag is `-` and an
    ASCII letter, its value attached or the next argument whatever that looks like."""
    args = ["-p0815", "-l", "-Strich", "-é", "-1", "-", "-ß", "x"]
    assert split_flags(args) == [
        ("-p", "0815"),
        ("-l", None),
        ("", "-Strich"),  # the value of the lone -l, though it looks like a flag
        ("", "-é"),  # a letter, but not ASCII: an argument, not a flag
        ("", "-1"),
        ("", "-"),
        ("", "-ß"),
        ("", "x"),
    ]
    flags = {**OPTIONS.cli_flags, "é": "lastName"}  # a map built without parse_flag_map's check
    with pytest.raises(OppError, match="unexpected argument '-é': OPP flags look like -p VALUE"):
        parse_args(["-p", "1", "-é", "Roe"], replace(OPTIONS, cli_flags=flags), today=TODAY)
    with pytest.raises(ValueError, match="'é=lastName' is not LETTER=FIELD"):
        parse_flag_map("p=reference é=lastName")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["-x", "1"], r"unknown flag -x \(known: -c \(command\) -p \(reference\)"),
        (["-p"], r"flag -p \(reference\) needs a value"),
        (["-p", "1", "-p", "2"], r"reference is given twice"),
        (["0815"], "unexpected argument '0815'"),
        (["-", "1"], "unexpected argument '-'"),
        (["-l", "Roe"], "no patient reference"),
        (["-p", "1", "-c", "DELETE"], "unknown OPP command 'DELETE'"),
    ],
)
def test_bad_command_lines_are_refused_with_a_reason(args: list[str], match: str) -> None:
    with pytest.raises(OppError, match=match):
        parse_args(args, OPTIONS, today=TODAY)


@pytest.mark.parametrize(
    ("fmt", "value", "expected"),
    [
        ("dd.MM.yyyy", "14.07.1985", date(1985, 7, 14)),
        ("d.M.yyyy", "5.7.1985", date(1985, 7, 5)),
        ("MM/dd/yyyy", "03/01/1990", date(1990, 3, 1)),
        ("dd/MM/yyyy", "03/01/1990", date(1990, 1, 3)),
        ("M/d/yyyy", "7/5/1985", date(1985, 7, 5)),
        ("yyyyMMdd", "19850714", date(1985, 7, 14)),
        ("yyyy-MM-dd", "1985-07-14", date(1985, 7, 14)),
        ("dd-MM-yyyy", "14-07-1985", date(1985, 7, 14)),
        ("dd.MM.yyyy", "00.00.0000", None),
    ],
)
@pytest.mark.parametrize("flag", ["-d", "-D"])
def test_date_format_flags_translate_dotnet_formats(
    fmt: str, value: str, expected: date | None, flag: str
) -> None:
    message = parse_args(["-p", "1", flag, fmt, "-b", value], OPTIONS, today=TODAY)
    assert message.demographics.birth_date == expected


@pytest.mark.parametrize(
    ("fmt", "value", "match"),
    [
        ("dd.MM.yy", "14.07.85", "two-digit year"),
        ("dd.MMM.yyyy", "14.Jul.1985", "unsupported token 'MMM'"),
        ("dddd, dd.MM.yyyy", "Sonntag, 14.07.1985", "unsupported token 'dddd'"),
        ("dd'.'MM'.'yyyy", "14.07.1985", "unsupported character"),
        ("MM.yyyy", "07.1985", "lacks day, month or year"),
        ("dd.MM.yyyy", "1985-07-14", "birthdate '1985-07-14' does not match dd.MM.yyyy"),
        ("dd.MM.yyyy", "31.02.1985", "does not match"),
    ],
)
def test_date_formats_are_never_guessed(fmt: str, value: str, match: str) -> None:
    with pytest.raises(OppError, match=match):
        parse_args(["-p", "1", "-d", fmt, "-b", value], OPTIONS, today=TODAY)


@pytest.mark.parametrize(
    ("fmt", "value", "match"),
    [
        ("yyyyMMdd", "1985111", "birthdate '1985111' does not match yyyyMMdd"),  # strptime: 1985-11-01
        ("yyyyMd", "1985111", "does not match yyyyMd"),  # January 11 or November 1
        ("dMyyyy", "1111985", "does not match dMyyyy"),  # strptime: January 11
        ("dd.MM.yyyy", "1.7.1985", "does not match dd.MM.yyyy"),
        ("d.M.yyyy", "014.7.1985", "does not match d.M.yyyy"),
        ("yyyy-MM-dd", "85-07-14", "does not match yyyy-MM-dd"),
        ("dd.MM.yyyy", "14.07.1985x", "does not match dd.MM.yyyy"),
    ],
)
def test_a_date_is_read_only_when_it_has_the_format_s_exact_widths(fmt: str, value: str, match: str) -> None:
    with pytest.raises(OppError, match=match) as err:
        parse_args(["-p", "1", "-d", fmt, "-b", value], OPTIONS, today=TODAY)
    assert err.value.kind == "invalid-date"


def test_single_letter_fields_without_separators_are_read_when_only_one_split_fits() -> None:
    message = parse_args(["-p", "1", "-d", "yyyyMd", "-b", "19851231"], OPTIONS, today=TODAY)
    assert message.demographics.birth_date == date(1985, 12, 31)
    with pytest.raises(OppError, match="birthdate '1985-7-14' does not match yyyy-MM-dd"):
        parse_args(["-p", "1", "-b", "1985-7-14"], OPTIONS, today=TODAY)  # ISO: two-digit month and day


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=8))
def test_arbitrary_argument_lists_give_a_message_or_an_opp_error(args: list[str]) -> None:
    try:
        message = parse_args(args, OPTIONS, today=TODAY)
    except OppError as exc:
        assert exc.kind in ERROR_KINDS and str(exc)
    else:
        assert message.reference and message.command in Command


def test_flag_maps_are_validated() -> None:
    assert parse_flag_map("p=reference, n=software")["n"] == "software"
    for text, match in [
        ("p=reference x=bogus", "'bogus' is not one of"),
        ("p=reference p=lastName", "mapped twice"),
        ("pp=reference", "is not LETTER=FIELD"),
        ("l=lastName", "no flag carries the patient reference"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_flag_map(text)


# --------------------------------------------------------------------------------------------------
# OPP web parameters


def test_parameter_names_are_compared_case_insensitively_and_unknown_ones_ignored() -> None:
    message = parse_params(
        {
            "COMMAND": "view",
            "Reference": "0042",
            "firstname": "Eva",
            "_": "1700000000",
            "software": "Web",
        }.items(),
        OPTIONS,
        today=TODAY,
    )
    assert (message.command, message.reference, message.demographics.first_name, message.software) == (
        Command.VIEW,
        "0042",
        "Eva",
        "Web",
    )


def test_parameters_take_a_dotnet_date_format_and_a_version() -> None:
    params = {"command": "VIEW", "reference": "1", "birthdate": "24.12.1979", "dateFormat": "dd.MM.yyyy"}
    assert parse_params(params.items(), OPTIONS, today=TODAY).demographics.birth_date == date(1979, 12, 24)
    with pytest.raises(OppError, match=r"version '9\.9'"):
        parse_params({**params, "version": "9.9"}.items(), OPTIONS, today=TODAY)


@pytest.mark.parametrize(
    "pairs",
    [
        [("command", "VIEW"), ("reference", "D1"), ("reference", "D2")],
        [("command", "VIEW"), ("reference", "D1"), ("Reference", "D1")],  # names compare case-insensitively
    ],
)
def test_a_parameter_given_twice_is_refused(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(OppError, match="parameter reference is given twice") as err:
        parse_params(pairs, OPTIONS, today=TODAY)
    assert err.value.kind == "invalid-field"
    assert (
        parse_params([*pairs[:2], ("_", "1"), ("_", "2")], OPTIONS, today=TODAY).reference == "D1"
    )  # others: ignored


def test_two_software_elements_are_refused_as_two_patients_are() -> None:
    data = opp_xml(extra='<software name="Other" version="1"/>').encode()
    with pytest.raises(OppError, match="has 2 <software> elements, not one"):
        parse_xml(data, OPTIONS, today=TODAY)


@pytest.mark.parametrize(
    ("query", "charset", "fallback", "last_name"),
    [
        (b"lastName=M%C3%BCller", None, "cp1252", "Müller"),
        (b"lastName=M%FCller", None, "cp1252", "Müller"),  # Latin-1 percent-encoding: the [opp] encoding
        (b"lastName=M%81ller", None, "cp850", "Müller"),
        (b"lastName=M\xfcller", None, "cp1252", "Müller"),  # a raw byte in a form body
        (b"lastName=Z%FC1", "iso-8859-1", "cp1252", "Zü1"),
        (b"lastName=%C5%BBak", "utf-8", "cp1252", "Żak"),
        (b"lastName=O%27Brien+%26+S%C3%B6hne", None, "cp1252", "O'Brien & Söhne"),
    ],
)
def test_parameter_values_are_read_in_the_charset_then_the_opp_encoding(
    query: bytes, charset: str | None, fallback: str, last_name: str
) -> None:
    pairs = form_params(b"command=VIEW&reference=1&" + query, charset, fallback)
    assert parse_params(pairs, OPTIONS, today=TODAY).demographics.last_name == last_name


def test_parameters_neither_charset_can_read_or_an_unknown_charset_are_refused() -> None:
    with pytest.raises(OppError, match="parameter lastName is neither utf-8 nor cp1252 text") as err:
        form_params(b"reference=1&lastName=M%81ller", None, "cp1252")  # 0x81: no cp1252 character
    assert err.value.kind == "invalid-field"
    with pytest.raises(OppError, match="parameter lastName is neither utf-8 nor utf-8 text"):
        form_params(b"reference=1&lastName=M%FCller", None, "utf-8")
    for charset in ("foo", "unicode_escape"):
        with pytest.raises(OppError) as err:
            form_params(b"reference=1", charset, "cp1252")
        assert err.value.kind == "unsupported-encoding"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([None, "utf-8", "iso-8859-1", "cp1252"]))
def test_arbitrary_form_bytes_give_a_message_or_an_opp_error(data: bytes, charset: str | None) -> None:
    try:
        message = parse_params(form_params(b"command=VIEW&" + data, charset, "cp1252"), OPTIONS, today=TODAY)
    except OppError as exc:
        assert exc.kind in ERROR_KINDS and str(exc)
    else:
        assert message.reference and message.command is Command.VIEW


@pytest.mark.parametrize("value", ["A\ufffeB", "A\uffffB", "A\ud800B"])
def test_characters_xml_cannot_carry_are_refused_in_any_field(value: str) -> None:
    with pytest.raises(OppError, match=f"lastName contains U\\+{ord(value[1]):04X}") as err:
        parse_params([("command", "VIEW"), ("reference", "1"), ("lastName", value)], OPTIONS, today=TODAY)
    assert err.value.kind == "invalid-field"
    with pytest.raises(OppError, match="reference contains"):
        parse_args(["-p", value], OPTIONS, today=TODAY)


# --------------------------------------------------------------------------------------------------
# The answer

PATIENT = PatientView(
    id=17,
    last_name="O'Brien & Söhne <GmbH>",
    first_name='Jürgen "Jo"',
    middle_name="",
    title="",
    birth_date=date(1985, 7, 14),
    sex=Sex.MALE,
    chart_number=None,
    pms_system="PMS",
    pms_id="000815",
    practice_id="",
)
IMAGE = ImageView(
    id=5,
    patient_id=17,
    study_uid="2.25.1",
    series_uid="2.25.2",
    sop_instance_uid="2.25.3",
    captured_at=datetime(2026, 3, 4, 10, 20, 30),
    category=Category.INTRAORAL_XRAY,
    tooth_numbers=(36, 37),
    rotation=0,
    mirrored=False,
    width=96,
    height=64,
    bits_stored=8,
    color=False,
    sha256="ab" * 32,
    media_type="image/png",
    file_ext="png",
)


def test_the_xml_answer_escapes_names_and_links_thumbnails() -> None:
    message = parse_xml(opp_xml(command="VIEW_DATA").encode(), OPTIONS, today=TODAY)
    outcome = Outcome(Status.OK, "1 images", patient=PATIENT, images=(IMAGE,))
    root = etree.fromstring(render_xml(outcome, message, {5: "http://h/opp/thumbnails/5.jpg?exp=1&sig=x"}))
    assert (root.tag, root.get("status"), root.get("patientId"), root.get("command")) == (
        "oppResult",
        "ok",
        "17",
        "VIEW_DATA",
    )
    patient = root.find("patient")
    assert patient is not None
    assert (patient.get("lastName"), patient.get("firstName"), patient.get("gender")) == (
        "O'Brien & Söhne <GmbH>",
        'Jürgen "Jo"',
        "MALE",
    )
    image = root.find("images/image")
    assert image is not None
    assert (image.get("id"), image.get("teeth"), image.get("thumbnail")) == (
        "5",
        "36 37",
        "http://h/opp/thumbnails/5.jpg?exp=1&sig=x",
    )


def test_a_stored_value_xml_cannot_carry_never_makes_the_answer_fail() -> None:
    """Another protocol may have stored such a name: the answer carries U+FFFD in its place."""
    message = parse_xml(opp_xml(command="VIEW").encode(), OPTIONS, today=TODAY)
    stored = replace(PATIENT, last_name="A\ufffeB\x01C", first_name="\uffffD", pms_id="7\x0b")
    outcome = Outcome(Status.OK, "patient 7\x0b opened", patient=stored)
    root = etree.fromstring(render_xml(outcome, message, {}))
    patient = root.find("patient")
    assert patient is not None
    assert (patient.get("lastName"), patient.get("firstName"), patient.get("reference")) == (
        "A\ufffdB\ufffdC",
        "\ufffdD",
        "7\ufffd",
    )
    assert root.findtext("message") == "patient 7\ufffd opened"
    lone = replace(PATIENT, last_name="A\ud800B")
    assert b'"A?B"' in render_json(Outcome(Status.OK, "ok", patient=lone), message, {})


def test_the_json_answer_has_status_patient_id_and_only_view_data_lists_images() -> None:
    import json

    view_data = parse_xml(opp_xml(command="VIEW_DATA").encode(), OPTIONS, today=TODAY)
    outcome = Outcome(Status.OK, "1 images", patient=PATIENT, images=(IMAGE,))
    data = json.loads(render_json(outcome, view_data, {5: "u"}))
    assert (data["status"], data["patient_id"], data["images"][0]["thumbnail_url"]) == ("ok", 17, "u")
    assert data["images"][0]["tooth_numbers"] == [36, 37]
    view = parse_xml(opp_xml(command="VIEW").encode(), OPTIONS, today=TODAY)
    data = json.loads(render_json(Outcome(Status.CREATED, "created", patient=PATIENT), view, {}))
    assert (data["status"], data["command"], "images" in data) == ("created", "VIEW", False)


# --------------------------------------------------------------------------------------------------
# .NET date formats (protocols.common)


@pytest.mark.parametrize(
    ("fmt", "directive"),
    [
        ("dd.MM.yyyy", "%d.%m.%Y"),
        ("yyyyMMdd", "%Y%m%d"),
        ("M/d/yy", "%m/%d/%y"),
        ("yyyy-MM-dd HH:mm", "%Y-%m-%d %H:%M"),
    ],
)
def test_dotnet_formats_translate_run_by_run(fmt: str, directive: str) -> None:
    assert dotnet_to_strptime(fmt) == directive


@pytest.mark.parametrize(
    "fmt", ["dd.MMM.yyyy", "ddd dd.MM.yyyy", "dd.MM.yyy", "dd.MM.yyyy tt", "%d.MM.yyyy", "dd\\.MM.yyyy"]
)
def test_dotnet_formats_with_names_or_escapes_are_refused(fmt: str) -> None:
    with pytest.raises(DateFormatError):
        dotnet_to_strptime(fmt)


def test_the_opp_field_limits_are_the_stores_counted_as_the_store_counts() -> None:
    """A field the store keeps is refused as field-too-long at its column's length, in UTF-16 code units
    as bridge.store.limits counts them: longer, the service refused it later in its own words (pms id,
    not reference); shorter, a name the store holds would be refused needlessly. 61 characters beyond
    the BMP are 122 units: field-too-long as 121 letters are."""
    assert FIELD_LIMITS["reference"] == TEXT_RULES["pms_id"].limit
    assert FIELD_LIMITS["lastName"] == TEXT_RULES["last_name"].limit == 120
    fields = {"command": "UPDATE_CREATE", "reference": "R1", "lastName": "L" * 120}
    assert from_fields(fields, OPTIONS, today=TODAY).demographics.last_name == "L" * 120
    with pytest.raises(OppError, match="lastName is longer than 120 characters") as refused:
        from_fields({**fields, "lastName": "L" * 121}, OPTIONS, today=TODAY)
    assert refused.value.kind == "field-too-long"
    fits = "\U0001f600" * 60
    assert from_fields({**fields, "lastName": fits}, OPTIONS, today=TODAY).demographics.last_name == fits
    with pytest.raises(OppError) as wide:
        from_fields({**fields, "lastName": "\U0001f600" * 61}, OPTIONS, today=TODAY)
    assert (wide.value.kind, str(wide.value)) == (
        "field-too-long",
        "lastName is longer than 120 characters (UTF-16 code units, as the store counts), got 122",
    )
