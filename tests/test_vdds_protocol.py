"""protocols.vdds as pure functions: bytes in, requests and answers out; the VDDS_MMI.INI edits."""

from __future__ import annotations

import codecs
import contextlib
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.model import Action, Category, ImageView, Origin, Outcome, Sex, Status
from protocols import vdds, vdds_exchange
from protocols.common import (
    IniSection,
    codepage,
    decode,
    ini_line,
    one_line,
    parse_ini,
    parse_key_values,
    split_lines,
)

ORIGIN = Origin(protocol="vdds", transport="cli", workstation="WS1")
SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "vdds"
# The daemon's date the parsers check birth dates against: fixed, so no test depends on the clock.
TODAY = date(2026, 12, 5)


def exchange(
    text: str, encoding: str = "cp1252", newline: str = "\r\n", bom: bytes = b""
) -> vdds_exchange.Exchange:
    body = text.strip("\n").replace("\n", newline) + newline
    return vdds_exchange.read_exchange(bom + body.encode(encoding))


def answered(data: bytes, fallback: str = "cp1252") -> dict[str, dict[str, str]]:
    """Every section's keys of an answer, as a PVS reads them (upper-cased section names)."""
    return {name: dict(section.items()) for name, section in parse_ini(decode(data, fallback).text).items()}


STAGE1 = """
[PATIENT]
PVS=CGM_Z1
PATID=002509
LASTNAME=Müller
FIRSTNAME=Heinz, von
BIRTHDAY=19710101
SEX=W
READY=0
ERRORLEVEL=0
ERRORTEXT=
"""


def image(image_id: int = 7, **changes: object) -> ImageView:
    values: dict[str, object] = {
        "id": image_id,
        "patient_id": 1,
        "study_uid": "2.25.1",
        "series_uid": "2.25.2",
        "sop_instance_uid": "2.25.3",
        "captured_at": datetime(2024, 3, 5, 10, 15),
        "category": Category.INTRAORAL_XRAY,
        "tooth_numbers": (11, 21),
        "rotation": 0,
        "mirrored": False,
        "width": 64,
        "height": 48,
        "bits_stored": 12,
        "color": False,
        "sha256": "0" * 64,
        "media_type": "image/png",
        "file_ext": "png",
        "comment": "Kontrolle",
    }
    values.update(changes)
    return ImageView(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Shared INI reading (protocols.common)


def test_ini_line_sees_what_parse_ini_sees() -> None:
    assert ini_line("  [Patient] trailing") == ("section", "Patient", "")
    assert ini_line('NAME = "Heinz, von" ') == ("key", "NAME", "Heinz, von")
    assert ini_line("A=b=c") == ("key", "A", "b=c")
    assert ini_line("; READY=1") == ("other", "", "")
    assert ini_line("=value") == ("other", "", "")
    assert ini_line("no equals sign") == ("other", "", "")
    assert ini_line("\ufeffREADY=0") == ("key", "READY", "0")


def test_one_line_breaks_every_kind_of_line_break() -> None:
    value = one_line("a\rb\nc\x0bd\x0ce\x1cf\x85g\u2028h")
    assert len(value.splitlines()) == 1
    assert parse_ini(f"[S]\nK={value}\nREADY=0\n")["S"].get("READY") == "0"


# Every character str.splitlines() breaks a line at besides CR and LF: VT, FF, FS, GS, RS, NEL and the
# Unicode line and paragraph separators. Windows' GetPrivateProfileString reads them as part of a value.
NOT_LINE_ENDS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("char", NOT_LINE_ENDS, ids=lambda char: f"U+{ord(char):04X}")
def test_only_cr_and_lf_end_a_line(char: str) -> None:
    """`PATID=Z2470817<char>999` is one line whose value holds the character (which the service then
    refuses), never PATID=Z2470817 and a line "999": that opened patient Z2470817."""
    text = f"[PATIENT]\r\nBVS=PMSBRIDGE{char}PATID=VICTIM\rPATID=Z2470817{char}999\nREADY=0\r\n"
    assert split_lines(text) == [
        "[PATIENT]",
        f"BVS=PMSBRIDGE{char}PATID=VICTIM",
        f"PATID=Z2470817{char}999",
        "READY=0",
    ]
    section = parse_ini(text)["PATIENT"]
    assert section.get("PATID") == f"Z2470817{char}999"
    assert section.get("BVS") == f"PMSBRIDGE{char}PATID=VICTIM"
    assert parse_key_values(f"PN=4711{char}999\r\nLN=Smith\r\n") == {"PN": f"4711{char}999", "LN": "Smith"}


def test_split_lines_drops_the_line_ends_as_splitlines_does() -> None:
    for text in ("", "a", "a\r\n", "a\r\nb", "a\n\n", "a\r\rb\r", "\r\n"):
        assert split_lines(text) == text.splitlines(), repr(text)


# --------------------------------------------------------------------------------------------------
# Detecting the request


@pytest.mark.parametrize(
    ("text", "kind", "main"),
    [
        (STAGE1, vdds_exchange.Kind.PATDATIMPORT, "PATIENT"),
        ("[PATID]\nPATID=1\nLASTNAME=X\nREADY=0", vdds_exchange.Kind.PATDATIMPORT, "PATID"),
        ("[PATID]\nPATID=1\nREADY=0", vdds_exchange.Kind.MMOINFEXPORT, "PATID"),
        ("[patid]\npatid=1\nready=0\n[MMOS]\nCOUNT=1", vdds_exchange.Kind.MMOINFEXPORT, "patid"),
        ("[MMOIDS]\nCOUNT=1\nMMOID1=3\nREADY=0", vdds_exchange.Kind.MMOEXPORT, "MMOIDS"),
        ("[PATID]\nPATID=1\nFROMPVS=Z1\nREADY=0", vdds_exchange.Kind.MMOINFIMPORT, "PATID"),
        ("[FOO]\nX=1\n[BAR]\nREADY=0", vdds_exchange.Kind.UNKNOWN, "BAR"),
        ("[FOO]\nX=1", vdds_exchange.Kind.UNKNOWN, "FOO"),
        ("no section at all", vdds_exchange.Kind.UNKNOWN, ""),
    ],
)
def test_the_request_is_detected_by_content(text: str, kind: vdds_exchange.Kind, main: str) -> None:
    found = exchange(text)
    assert (found.kind, found.main) == (kind, main)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        (STAGE1, vdds_exchange.FolderState.COMPLETE),
        ("[PATIENT]\nPATID=1\nLASTNAME=Mül", vdds_exchange.FolderState.INCOMPLETE),
        ("[PATIENT]\nPATID=1\nREADY=0\nERRORLEVEL=0", vdds_exchange.FolderState.INCOMPLETE),
        ("[PATIENT]\nPATID=1\nREADY=0\nERRORLEVEL=0\nERROR-TEXT=", vdds_exchange.FolderState.COMPLETE),
        ("[PATIENT]\nPATID=1\nERRORLEVEL=0\nERRORTEXT=\nREADY=1", vdds_exchange.FolderState.ANSWERED),
        ("[BILDIMPORT]\nREADY=0", vdds_exchange.FolderState.INCOMPLETE),
        ("[SETTINGS]\nCOLOR=1", vdds_exchange.FolderState.FOREIGN),
        (
            "[PATID]\nPATID=1\nFROMPVS=Z1\nREADY=0\nERRORLEVEL=0\nERRORTEXT=",
            vdds_exchange.FolderState.FOREIGN,
        ),
        ("", vdds_exchange.FolderState.FOREIGN),
    ],
)
def test_folder_state(text: str, state: vdds_exchange.FolderState) -> None:
    assert vdds_exchange.folder_state(text.replace("\n", "\r\n").encode("cp1252")) is state


def test_a_thumbnail_in_the_folder_is_foreign() -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00" + bytes(range(256)) * 4
    assert vdds_exchange.folder_state(jpeg) is vdds_exchange.FolderState.FOREIGN


# --------------------------------------------------------------------------------------------------
# Requests


def test_stage1_request() -> None:
    req = vdds.patient_request(exchange(STAGE1), ORIGIN, vdds.Options(), today=TODAY)
    assert req.action is Action.OPEN
    assert (req.pms_system, req.pms_id, req.practice_id) == ("CGM_Z1", "002509", "")
    demo = req.demographics
    assert (demo.last_name, demo.first_name, demo.birth_date, demo.sex) == (
        "Müller",
        "Heinz, von",
        date(1971, 1, 1),
        Sex.FEMALE,
    )


@pytest.mark.parametrize(
    ("birthday", "expected"),
    [
        ("19710101", date(1971, 1, 1)),
        ("01.01.1971", date(1971, 1, 1)),
        ("1.1.1971", date(1971, 1, 1)),
        ("1971-01-01", date(1971, 1, 1)),
        ("00000000", None),
        ("", None),
        ("00.00.0000", None),
    ],
)
def test_every_date_form(birthday: str, expected: date | None) -> None:
    text = STAGE1.replace("BIRTHDAY=19710101", f"BIRTHDAY={birthday}")
    assert (
        vdds.patient_request(exchange(text), ORIGIN, vdds.Options(), today=TODAY).demographics.birth_date
        == expected
    )


@pytest.mark.parametrize(
    ("code", "sex"),
    [
        ("M", Sex.MALE),
        ("W", Sex.FEMALE),
        ("f", Sex.FEMALE),
        ("D", Sex.OTHER),
        ("X", Sex.OTHER),
        ("U", Sex.UNKNOWN),
        ("", Sex.UNKNOWN),
    ],
)
def test_every_sex_code(code: str, sex: Sex) -> None:
    text = STAGE1.replace("SEX=W", f"SEX={code}")
    assert vdds.patient_request(exchange(text), ORIGIN, vdds.Options(), today=TODAY).demographics.sex is sex


def test_german_keys_and_practice_number() -> None:
    text = (
        "[PATIENT]\nPVS=Z1\nPRXNR=02\nPATID=0815\nNAME=Schäfer\nVORNAME=Jürgen\nGEBDATUM=14.07.1985\nREADY=0"
    )
    req = vdds.patient_request(exchange(text), ORIGIN, vdds.Options(), today=TODAY)
    assert (req.practice_id, req.demographics.last_name, req.demographics.first_name) == (
        "02",
        "Schäfer",
        "Jürgen",
    )
    assert req.demographics.birth_date == date(1985, 7, 14)
    no_practice = vdds.patient_request(exchange(text), ORIGIN, vdds.Options(practice_key=""), today=TODAY)
    assert no_practice.practice_id == ""


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[PATIENT]\nPVS=Z1\nLASTNAME=X\nREADY=0", "no_patid"),
        ("[PATIENT]\nPATID=1\nLASTNAME=X", "incomplete"),
        ("[PATIENT]\nPATID=1\nBIRTHDAY=31.02.1970\nREADY=0", "bad_date"),
        ("[PATIENT]\nPATID=1\nBIRTHDAY=1970/01/01\nREADY=0", "bad_date"),
        # short digits, which strptime's flexible widths read as 7103-01-05, 1971-11-01 and 1971-01-02
        ("[PATIENT]\nPATID=1\nBIRTHDAY=710315\nREADY=0", "bad_date"),
        ("[PATIENT]\nPATID=1\nBIRTHDAY=1971111\nREADY=0", "bad_date"),
        ("[PATIENT]\nPATID=1\nBIRTHDAY=197112\nREADY=0", "bad_date"),
        ("[PATIENT]\nPATID=1\nBIRTHDAY=20991231\nREADY=0", "future_date"),
        ("[PATIENT]\nPATID=1\nBIRTHDAY=07.12.2026\nREADY=0", "future_date"),  # TODAY + 2 days
        (f"[PATIENT]\nPATID={'1' * 101}\nREADY=0", "too_long"),
        (f"[PATIENT]\nPATID=1\nLASTNAME={'x' * 121}\nREADY=0", "too_long"),
        ("[FOO]\nREADY=0", "unknown_request"),
        ("[MMOIDS]\nCOUNT=0\nREADY=0", "no_mmoids"),
        ("[MMOIDS]\nCOUNT=1\nMMOID1=1\nEXT=BMP\nREADY=0", "bad_format"),
        ("[MMOIDS]\nCOUNT=501\nMMOID1=1\nREADY=0", "too_many"),
    ],
)
def test_refused_requests_name_their_reason(text: str, code: str) -> None:
    with pytest.raises(vdds.VddsError) as caught:
        vdds.patient_request(exchange(text), ORIGIN, vdds.Options(), today=TODAY)
    assert caught.value.code == code
    assert caught.value.text("de") != caught.value.text("en")


def test_a_birth_date_in_the_future_is_refused_and_tomorrow_is_not() -> None:
    """A birth date after today is a typo (20991231 for 19991231): refused in German with ERRORLEVEL=1
    like an invalid one; tomorrow is the day of slack for a practice ahead of the daemon's time zone."""
    future = STAGE1.replace("BIRTHDAY=19710101", "BIRTHDAY=20991231")
    with pytest.raises(vdds.VddsError) as caught:
        vdds.patient_request(exchange(future), ORIGIN, vdds.Options(), today=TODAY)
    assert caught.value.text("de") == "Das Geburtsdatum '20991231' liegt in der Zukunft."
    tomorrow = STAGE1.replace("BIRTHDAY=19710101", "BIRTHDAY=20261206")
    request = vdds.patient_request(exchange(tomorrow), ORIGIN, vdds.Options(), today=TODAY)
    assert request.demographics.birth_date == date(2026, 12, 6)


def test_missing_pvs_falls_back_to_the_default() -> None:
    text = "[PATIENT]\nPATID=5\nREADY=0"
    assert (
        vdds.patient_request(
            exchange(text), ORIGIN, vdds.Options(default_pvs="PRAXIS"), today=TODAY
        ).pms_system
        == "PRAXIS"
    )


def test_export_request_keeps_slots_and_aliases_formats() -> None:
    text = "[MMOIDS]\nPVS=Z1\nCOUNT=4\nMMOID1=10\nMMOID3=011\nMMOID4= 12 \nMMOID9=99\nEXT=.jpeg\nREADY=0"
    found = exchange(text)
    req = vdds.patient_request(found, ORIGIN, vdds.Options(), today=TODAY)
    assert req.action is Action.EXPORT_IMAGES
    assert req.image_refs == ("10", "011", "12")
    assert req.export_format == "JPG"
    assert found.request is not None
    assert vdds.export_slots(found.request, 500) == [(1, "10"), (3, "011"), (4, "12")]
    no_count = exchange("[MMOIDS]\nMMOID2=5\nMMOID1=4\nREADY=0")
    assert no_count.request is not None
    assert vdds.export_slots(no_count.request, 500) == [(1, "4"), (2, "5")]
    assert vdds.export_format("", "PNG") == "PNG"
    assert vdds.export_format("tiff", "JPG") == "TIF"
    assert vdds.export_format("Dicom", "JPG") == "DCM"


@pytest.mark.parametrize(
    ("mode", "flag", "args", "action"),
    [
        ("off", "ACQUIRE=1", ("ACQUIRE",), Action.OPEN),
        ("always", "", (), Action.ACQUIRE),
        ("flagged", "", (), Action.OPEN),
        ("flagged", "ACQUIRE=J", (), Action.ACQUIRE),
        ("flagged", "ACQUIRE=0", (), Action.OPEN),
        ("flagged", "", ("acquire",), Action.ACQUIRE),
    ],
)
def test_stage5_is_behind_configuration(mode: str, flag: str, args: tuple[str, ...], action: Action) -> None:
    text = STAGE1.replace("SEX=W", f"SEX=W\n{flag}")
    req = vdds.patient_request(exchange(text), ORIGIN, vdds.Options(stage5=mode), args, today=TODAY)
    assert req.action is action


def test_view_request() -> None:
    req = vdds.view_request(" 17 ", ORIGIN)
    assert (req.action, req.image_refs) == (Action.VIEW_IMAGE, ("17",))
    with pytest.raises(vdds.VddsError):
        vdds.view_request("", ORIGIN)


# --------------------------------------------------------------------------------------------------
# A reused exchange file: answered sections are history

REUSED_PATID = (
    "[PATIENT]\nPVS=Z1\nPATID=N1\nLASTNAME=x\nERRORLEVEL=0\nERRORTEXT=\nREADY=1\n\n"
    "[PATID]\nPVS=Z1\nPATID=002509\nREADY=0\nERRORLEVEL=0\nERRORTEXT=\n"
)
REUSED_MMOIDS = (
    "[MMOIDS]\nPVS=Z1\nCOUNT=1\nMMOID1=5\nERRORLEVEL=0\nERRORTEXT=\nREADY=1\n[MMOPATH]\nMMOID1=C:\\x\\5.jpg\n"
    "[PATIENT]\nPVS=Z1\nPATID=SP2\nLASTNAME=Neu\nREADY=0\nERRORLEVEL=0\nERRORTEXT=\n"
)
TWO_OPEN = (
    "[PATIENT]\nPVS=Z1\nPATID=A1\nLASTNAME=x\nREADY=0\nERRORLEVEL=0\nERRORTEXT=\n"
    "[PATID]\nPVS=Z1\nPATID=B2\nREADY=0\nERRORLEVEL=0\nERROR-TEXT=\n"
)


@pytest.mark.parametrize(
    ("text", "kind", "targets", "state"),
    [
        (REUSED_PATID, vdds_exchange.Kind.MMOINFEXPORT, ("PATID",), vdds_exchange.FolderState.COMPLETE),
        (REUSED_MMOIDS, vdds_exchange.Kind.PATDATIMPORT, ("PATIENT",), vdds_exchange.FolderState.COMPLETE),
        (
            REUSED_PATID.replace("READY=0", "READY=1"),
            vdds_exchange.Kind.PATDATIMPORT,  # all answered: the first by priority, left alone
            ("PATIENT",),
            vdds_exchange.FolderState.ANSWERED,
        ),
        (TWO_OPEN, vdds_exchange.Kind.AMBIGUOUS, ("PATIENT", "PATID"), vdds_exchange.FolderState.INCOMPLETE),
        (  # READY absent counts as unanswered too
            "[MMOIDS]\nCOUNT=1\nMMOID1=5\n[PATID]\nPATID=1\nREADY=0\nERRORLEVEL=0\nERRORTEXT=",
            vdds_exchange.Kind.AMBIGUOUS,
            ("MMOIDS", "PATID"),
            vdds_exchange.FolderState.INCOMPLETE,
        ),
    ],
)
def test_the_request_is_the_unanswered_section(
    text: str, kind: vdds_exchange.Kind, targets: tuple[str, ...], state: vdds_exchange.FolderState
) -> None:
    found = exchange(text)
    assert (found.kind, found.targets, found.main) == (kind, targets, targets[0])
    data = text.strip("\n").replace("\n", "\r\n").encode("cp1252") + b"\r\n"
    assert vdds_exchange.folder_state(data) is state


def test_the_answer_goes_into_the_served_section_and_history_keeps_its_bytes() -> None:
    found = exchange(REUSED_PATID)
    assert vdds.patient_request(found, ORIGIN, vdds.Options(), today=TODAY).pms_id == "002509"
    data = vdds_exchange.answer(found, 0, "", vdds.info_sections([], vdds.Options(), {}))
    history = "[PATIENT]\r\nPVS=Z1\r\nPATID=N1\r\nLASTNAME=x\r\nERRORLEVEL=0\r\nERRORTEXT=\r\nREADY=1\r\n\r\n"
    assert data.startswith(history.encode("cp1252"))
    got = answered(data)
    assert got["PATID"] == {"PVS": "Z1", "PATID": "002509", "ERRORLEVEL": "0", "ERRORTEXT": "", "READY": "1"}
    assert got["MMOS"] == {"COUNT": "0"}
    assert vdds_exchange.read_exchange(data).answered

    request = vdds.patient_request(exchange(REUSED_MMOIDS), ORIGIN, vdds.Options(), today=TODAY)
    assert (request.action, request.pms_id) == (Action.OPEN, "SP2")


def test_several_unanswered_requests_are_refused_in_each_of_them() -> None:
    found = exchange(TWO_OPEN)
    with pytest.raises(vdds.VddsError) as refused:
        vdds.patient_request(found, ORIGIN, vdds.Options(), today=TODAY)
    text = refused.value.text("de")
    assert text.startswith("Die Übergabedatei enthält mehrere unbeantwortete Anfragen ([PATIENT], [PATID])")
    got = answered(vdds_exchange.answer(found, 1, text))
    handshake = {
        "ERRORLEVEL": "1",
        "ERRORTEXT": text,
        "ERROR-TEXT": text,
        "READY": "1",
    }  # both spellings in use
    assert got["PATIENT"] == {"PVS": "Z1", "PATID": "A1", "LASTNAME": "x", **handshake}
    assert got["PATID"] == {"PVS": "Z1", "PATID": "B2", **handshake}


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [
        ("cp1252", b""),
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("utf-16-le", b""),
    ],
)
def test_an_oversized_file_is_answered_from_its_head_in_its_encoding(encoding: str, bom: bytes) -> None:
    text = "[PATID]\r\nPATID=Ä1\r\nREADY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n[NOTES]\r\nN1=ü\r\nN2=ü\r\n"
    data = bom + text.encode(encoding)
    head = data[: data.index("N2".encode(encoding)) + 3]  # cut inside a line (and a UTF-16 code unit)
    cut = vdds_exchange.whole_lines(head)
    assert cut == data[: data.index("N2".encode(encoding))]
    new_head, n = vdds_exchange.too_large_answer(head, 5_000_000, 4_194_304, "en", "cp1252")
    assert n == len(cut) and new_head.startswith(bom)
    whole = new_head + data[n:]
    got = answered(whole)
    assert got["PATID"] == {
        "PATID": "Ä1",
        "ERRORLEVEL": "1",
        "ERRORTEXT": "The exchange file is too large (5000000 bytes, at most 4194304); it was not "
        "carried out.",
        "READY": "1",
    }
    assert got["NOTES"] == {"N1": "ü", "N2": "ü"}
    assert vdds_exchange.whole_lines(bom + "[PATID] no line end".encode(encoding)) == bom


# Answers


def test_answer_keeps_the_pvs_lines_and_puts_ready_last() -> None:
    found = exchange(STAGE1)
    data = vdds_exchange.answer(found, 0, "")
    text = data.decode("cp1252")
    assert (
        text
        == STAGE1.strip("\n")
        .replace("READY=0\nERRORLEVEL=0\nERRORTEXT=", "ERRORLEVEL=0\nERRORTEXT=\nREADY=1")
        .replace("\n", "\r\n")
        + "\r\n"
    )


def test_answer_keeps_a_line_holding_a_vertical_tab_as_it_was() -> None:
    """The PVS's own lines stay exactly as they were: `PATID=Z6696672<VT>999` is one line (as Windows
    reads it) and is not rewritten into two."""
    found = exchange(STAGE1.replace("PATID=002509", "PATID=Z6696672\x0b999"))
    text = vdds_exchange.answer(found, 1, "invalid").decode("cp1252")
    assert "\r\nPATID=Z6696672\x0b999\r\nLASTNAME=" in text
    assert answered(text.encode("cp1252"))["PATIENT"]["READY"] == "1"


def test_answer_in_the_received_encoding_bom_and_line_ends() -> None:
    for encoding, bom, newline in (
        ("utf-16-le", b"\xff\xfe", "\r\n"),
        ("utf-16-be", b"\xfe\xff", "\n"),
        ("utf-8", b"\xef\xbb\xbf", "\n"),
        ("cp1252", b"", "\n"),
    ):
        found = exchange(STAGE1, encoding, newline, bom)
        data = vdds_exchange.answer(found, 1, "Fehler: Größe ä")
        assert data.startswith(bom)
        again = decode(data)
        assert (again.encoding.replace("-sig", ""), again.newline) == (encoding, newline)
        assert answered(data)["PATIENT"]["ERRORTEXT"] == "Fehler: Größe ä"


def test_auto_reads_bomless_utf8_as_utf8_and_answers_in_it() -> None:
    """`[vdds] encoding = auto`: bytes that are valid UTF-8 with a multi-byte sequence are UTF-8 (gdt2dicom
    writes BOM-less UTF-8, and "Müller" was stored as "MÃ¼ller"); anything else is cp1252; an explicit
    code page is never second-guessed. The answer goes back in UTF-8 without a BOM."""
    auto = vdds_exchange.read_codepage("auto")
    utf8 = STAGE1.replace("\n", "\r\n").encode("utf-8")
    request = vdds_exchange.read_exchange(utf8, auto)
    assert (request.decoded.encoding, request.decoded.bom) == ("utf-8", b"")
    assert vdds.demographics(request.request or IniSection(""), TODAY).last_name == "Müller"
    data = vdds_exchange.answer(request, 1, "Übergabe ungültig")
    assert not data.startswith(codecs.BOM_UTF8)
    found = answered(data, "utf-8")["PATIENT"]
    assert (found["LASTNAME"], found["ERRORTEXT"], found["READY"]) == ("Müller", "Übergabe ungültig", "1")
    assert vdds_exchange.unreachable_answer(utf8, "down", {}).decode("utf-8").count("Müller") == 1
    # cp1252 with umlauts is not valid UTF-8; ASCII reads the same either way and is answered in cp1252
    cp1252 = STAGE1.encode("cp1252")
    assert vdds_exchange.read_exchange(cp1252, auto).decoded.encoding == "cp1252"
    ascii_only = vdds_exchange.read_exchange(STAGE1.replace("ü", "ue").encode("ascii"), auto)
    assert ascii_only.decoded.encoding == "cp1252"
    assert vdds_exchange.answer(ascii_only, 1, "ungültig").count("ungültig".encode("cp1252")) == 1
    # explicit code pages stay as they are; files we write ourselves (push files) stay cp1252
    assert (
        vdds_exchange.read_exchange(utf8, vdds_exchange.read_codepage("cp1252")).decoded.encoding == "cp1252"
    )
    assert codepage("auto") == "cp1252"


def test_answer_mirrors_error_text_spelling_and_cleans_values() -> None:
    found = exchange("[PATID]\nPATID=1\nREADY=0\nERRORLEVEL=0\nERROR-TEXT=")
    keys = answered(vdds_exchange.answer(found, 1, "zwei\nZeilen\x0cREADY=0\x00"))["PATID"]
    assert keys["ERROR-TEXT"] == "zwei Zeilen READY=0"
    assert "ERRORTEXT" not in keys
    assert keys["READY"] == "1"


def test_answer_replaces_an_earlier_answer_and_every_handshake_duplicate() -> None:
    text = (
        "[PATID]\nPATID=1\nREADY=1\nready=0\n[MMOS]\nCOUNT=3\n[MMO1]\nMMOID=1\n[MMO3]\nMMOID=3\n"
        "[PATID]\nREADY=0\nERRORLEVEL=7\n[OTHER]\nREADY=0\n"
    )
    found = exchange(text)
    sections = vdds.info_sections([image(5)], vdds.Options(), {5: "C:\\x\\5.jpg"})
    data = vdds_exchange.answer(found, 0, "", sections)
    got = answered(data)
    assert got["PATID"]["READY"] == "1" and got["PATID"]["ERRORLEVEL"] == "0"
    assert got["MMOS"] == {"COUNT": "1"}
    assert "MMO3" not in got
    assert got["OTHER"] == {"READY": "0"}  # not ours to touch
    assert data.decode("cp1252").count("READY=1") == 1


def test_info_sections() -> None:
    opts = vdds.Options()
    imported = image(
        8, captured_at=None, imported_at=datetime(2024, 1, 2, 3, 4, tzinfo=UTC), tooth_numbers=()
    )
    sections = dict(vdds.info_sections([image(7), imported], opts, {7: "/e/7.jpg"}, prxnr="2"))
    assert sections["MMOS"] == [("COUNT", "2")]
    assert dict(sections["MMO1"]) == {
        "MMOID": "7",
        "PRXNR": "2",
        "TYPE": "Röntgenbild intraoral",
        "TYPENR": "1",
        "EXT": "PNG",
        "DATE": "20240305",
        "TIME": "10:15",
        "COMMENT": "Kontrolle (Zahn 11, 21)",
        "THUMBNAIL": "/e/7.jpg",
    }
    second = dict(sections["MMO2"])
    assert second["DATE"].startswith("2024010") and "THUMBNAIL" not in second
    no_key = dict(vdds.info_sections([image(7)], vdds.Options(thumbnail_key=""), {7: "/e/7.jpg"}))
    assert "THUMBNAIL" not in dict(no_key["MMO1"])


def test_the_image_list_is_newest_first_by_the_date_it_shows() -> None:
    """DATE is the capture time, else the import time: a photo without a capture time imported after an
    older capture comes first (the store's order, by capture time alone, put it after)."""
    captured = image(1, captured_at=datetime(2024, 3, 5, 10, 15))
    photo = image(2, captured_at=None, imported_at=datetime(2026, 12, 5, 9, 0, tzinfo=UTC))
    undated = image(3, captured_at=None, imported_at=None)
    same_time = image(4, captured_at=datetime(2024, 3, 5, 10, 15))
    sections = dict(vdds.info_sections([captured, same_time, photo, undated], vdds.Options(), {}))
    listed = [(dict(sections[f"MMO{k}"])["MMOID"], dict(sections[f"MMO{k}"])["DATE"]) for k in range(1, 5)]
    assert listed == [("2", "20261205"), ("4", "20240305"), ("1", "20240305"), ("3", "")]


def test_export_sections_and_outcome_errors() -> None:
    assert vdds.export_sections([(1, "4"), (3, "9")], {"9": "/x/9.jpg"}) == [
        ("MMOPATH", [("MMOID3", "/x/9.jpg")])
    ]
    assert vdds.export_sections([(1, "4")], {}) == [("MMOPATH", [])]
    opts = vdds.Options()
    assert vdds.outcome_error(Outcome(Status.OK), vdds_exchange.Kind.PATDATIMPORT, opts) == (0, "")
    partial = Outcome(Status.PARTIAL, missing_refs=("99", "x"))
    assert vdds.outcome_error(partial, vdds_exchange.Kind.MMOEXPORT, opts) == (
        1,
        "Bilder nicht gefunden: 99, x.",
    )
    conflict = Outcome(Status.CONFLICT, "birth date differs", conflict_id=4)
    level, text = vdds.outcome_error(
        conflict, vdds_exchange.Kind.PATDATIMPORT, vdds.Options(language="en"), "0815"
    )
    assert level == 1 and "conflict no. 4" in text and "birth date differs" in text


def test_data_the_store_cannot_take_is_answered_as_invalid_not_as_an_internal_error() -> None:
    """The service's "invalid" (a control character, U+FFFD, a value too long for the store) is the PVS's
    data: its own sentence with the detail for IT, ERRORLEVEL=1 as every refusal; "Interner Fehler"
    sent the receptionist to IT for a name typed wrong."""
    invalid = Outcome(Status.INVALID, "last name must not contain a control character (U+0001)")
    for language, sentence in (
        ("de", "Die übermittelten Daten sind ungültig; nichts wurde geändert."),
        ("en", "The data sent are not valid; nothing was changed."),
    ):
        level, text = vdds.outcome_error(
            invalid, vdds_exchange.Kind.PATDATIMPORT, vdds.Options(language=language), "0815"
        )
        assert (level, text) == (1, f"{sentence} (last name must not contain a control character (U+0001))")


STAGE4 = """
[MMOIDS]
PVS=CGM_Z1
COUNT=1
MMOID1=999
EXT=JPG
READY=0
ERRORLEVEL=0
ERRORTEXT=
"""


def test_a_stage4_answer_always_has_its_mmopath_section() -> None:
    """protocols.md [C]: the answer is [MMOPATH]; gdt2dicom takes it with `expect` whatever the
    ERRORLEVEL, so an error answer without it crashed the PVS side. Empty when nothing was exported."""
    request = exchange(STAGE4)
    for data in (
        vdds_exchange.answer(request, 1, "Bilder nicht gefunden: 999."),  # unknown ids, a bad EXT ...
        vdds_exchange.unreachable_answer(request.decoded.encode(request.decoded.text), "refused", {}),
        vdds_exchange.answer(request, 1, "x", vdds.export_sections([(1, "999")], {})),
    ):
        found = answered(data)
        assert found["MMOPATH"] == {}
        assert (found["MMOIDS"]["ERRORLEVEL"], found["MMOIDS"]["READY"]) == ("1", "1")
        assert data.count(b"[MMOPATH]") == 1
    exported = vdds_exchange.answer(request, 0, "", vdds.export_sections([(1, "999")], {"999": "C:\\x.jpg"}))
    assert answered(exported)["MMOPATH"] == {"MMOID1": "C:\\x.jpg"}
    # an earlier answer's [MMOPATH] in a reused file is replaced, not kept beside the new one
    again = exchange(STAGE4 + "[MMOPATH]\nMMOID1=C:\\old.jpg\n")
    assert answered(vdds_exchange.answer(again, 1, "x"))["MMOPATH"] == {}
    # other requests get no such section
    assert "MMOPATH" not in answered(vdds_exchange.answer(exchange(STAGE1), 1, "x"))


def test_unreachable_answer_uses_the_raw_settings() -> None:
    content = STAGE1.replace("\n", "\r\n").encode("cp850")
    data = vdds_exchange.unreachable_answer(
        content, "connection refused", {"language": "en", "encoding": "cp850"}
    )
    keys = answered(data, "cp850")["PATIENT"]
    assert keys["LASTNAME"] == "Müller"
    assert keys["ERRORTEXT"].startswith("The imaging service") and keys["ERRORTEXT"].endswith(
        "(connection refused)"
    )
    assert (keys["ERRORLEVEL"], keys["READY"]) == ("1", "1")
    german = answered(vdds_exchange.unreachable_answer(b"", "timed out", {}))["PATIENT"]
    assert german["ERRORTEXT"].startswith("Die Bildverwaltung")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_always_get_ready_1(data: bytes) -> None:
    found = vdds_exchange.read_exchange(data)
    with contextlib.suppress(vdds.VddsError):  # the only exception a request may raise
        vdds.patient_request(found, ORIGIN, vdds.Options(), today=TODAY)
    out = vdds_exchange.answer(found, 1, "Fehler")
    main = (found.main or vdds_exchange.FALLBACK_SECTION).upper()
    sections = parse_ini(decode(out).text)
    assert main in sections or vdds_exchange.FALLBACK_SECTION in sections
    section = sections.get(main) or sections[vdds_exchange.FALLBACK_SECTION]
    assert section.get("READY") == "1"
    assert vdds_exchange.folder_state(out) in (
        vdds_exchange.FolderState.ANSWERED,
        vdds_exchange.FolderState.FOREIGN,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "[PATIENT]",
                "[PATID]",
                "[MMOIDS]",
                "[MMOS]",
                "[MMO1]",
                "READY=0",
                "READY=1",
                "PATID=1",
                "COUNT=2",
                "MMOID1=1",
                "ERROR-TEXT=",
                "x=y",
                ";c",
                "",
            ]
        ),
        max_size=12,
    ),
    st.sampled_from(["cp1252", "utf-16-le", "utf-8"]),
)
def test_structured_requests_always_get_ready_1(lines: list[str], encoding: str) -> None:
    found = exchange("\n".join(lines), encoding, bom=b"\xff\xfe" if encoding == "utf-16-le" else b"")
    out = vdds_exchange.answer(found, 1, "x", [("MMOS", [("COUNT", "0")])])
    section = parse_ini(decode(out).text)[(found.main or vdds_exchange.FALLBACK_SECTION).upper()]
    assert section.get("READY") == "1"


# --------------------------------------------------------------------------------------------------
# Stage 6 push file


def test_push_file_and_reply() -> None:
    pairs = vdds.object_pairs(image(3), vdds.Options(), prxnr="1", thumbnail="/t/3.jpg", imagedata="/e/3.jpg")
    data = vdds.push_bytes(
        pvs="PVS_ARCHIV",
        from_pvs="CGM_Zü",
        bvs="PMSBRIDGE",
        prxnr="1",
        patid="002509",
        objects=[pairs],
        codepage="cp850",
    )
    assert b"\r\nFROMPVS=CGM_Z\x81\r\n" in data  # the code page asked for, CRLF line ends
    assert data.count(b"\n") == data.count(b"\r\n") and not data.startswith(b"\xef\xbb\xbf")
    text = data.decode("cp850")
    sections = parse_ini(text)
    assert dict(sections["PATID"].items())["FROMPVS"] == "CGM_Zü"
    assert sections["PATID"].get("READY") == "0"
    assert sections["MMO1"].get("IMAGEDATA") == "/e/3.jpg"
    assert vdds_exchange.folder_state(data) is vdds_exchange.FolderState.FOREIGN
    assert not vdds.push_reply(data).ready
    done = vdds.push_reply(text.replace("READY=0", "READY=1").encode())
    assert done.ready and done.accepted
    blank = vdds.push_reply(
        text.replace("READY=0", "READY=1").replace("ERRORLEVEL=0", "ERRORLEVEL=").encode()
    )
    assert blank.ready and blank.accepted
    refused = vdds.push_reply(
        text.replace("READY=0", "READY=1").replace("ERRORLEVEL=0", "ERRORLEVEL=12").encode()
    )
    assert refused.ready and not refused.accepted


@pytest.mark.parametrize(
    ("value", "ok"), [("0", True), ("", True), (" 0 ", True), ("1", False), ("12", False)]
)
def test_errorlevel_success_is_0_or_empty(value: str, ok: bool) -> None:
    """One reading for answers found already given and for the PVS's answer to a push."""
    assert vdds_exchange.errorlevel_ok(value) is ok


# --------------------------------------------------------------------------------------------------
# VDDS_MMI.INI

ENTRY = vdds.BvsEntry(
    section="PMSBRIDGE",
    name="pms-bridge",
    command=r"C:\PMSBRI~1\pms-bridge.exe vdds --config C:\PMSBRI~1\pms-bridge.ini",
    os_code="1",
    install_dir=r"C:\PMSBRI~1",
    stages="1234",
    version="1.4",
)


def test_register_changes_only_our_places() -> None:
    original = (SAMPLES / "VDDS_MMI.INI").read_bytes()
    registered = vdds.register(original, ENTRY)
    assert registered.startswith(
        original.split(b"NAME3=VISIQUICK\r\n")[0] + b"NAME3=VISIQUICK\r\nNAME4=PMSBRIDGE\r\n"
    )
    assert registered.endswith(
        b"\r\n[PMSBRIDGE]\r\nNAME=pms-bridge\r\nPATDATIMPORT="
        + ENTRY.command.encode()
        + b"\r\n"
        + registered.split(b"PATDATIMPORT=", 2)[2].split(b"\r\n", 1)[1]
    )
    removed_lines = set(original.splitlines()) - set(registered.splitlines())
    assert removed_lines == set()  # every line of the other entries is still there, byte for byte
    sections = parse_ini(registered.decode("cp1252"))
    assert sections["DBSWIN"].get("NAME") == "Dürr DBSWin"
    ours = sections["PMSBRIDGE"]
    assert [ours.get(k) for k in ("MMOVIEW", "MMOVIEW_OS", "STAGES", "VERSION")] == [
        ENTRY.command,
        "1",
        "1234",
        "1.4",
    ]
    assert vdds.register(registered, ENTRY) == registered  # idempotent
    assert vdds.unregister(registered, "PMSBRIDGE") == original


def test_register_updates_in_place_and_reuses_our_index() -> None:
    original = b"[BVS]\nNAME2=PMSBRIDGE\n\n[PMSBRIDGE]\nNAME=old\nSTAGES=14\n\n[OTHER]\nA=1\n"
    updated = vdds.register(original, ENTRY)
    assert updated.startswith(b"[BVS]\nNAME2=PMSBRIDGE\n\n[PMSBRIDGE]\nNAME=pms-bridge\n")
    assert updated.endswith(b"VERSION=1.4\n\n[OTHER]\nA=1\n")
    assert b"NAME3" not in updated and b"\r\n" not in updated


def test_register_into_an_empty_or_missing_file_and_refuse_what_cp1252_cannot_hold() -> None:
    created = vdds.register(b"", ENTRY)
    assert parse_ini(created.decode("cp1252"))["BVS"].get("NAME1") == "PMSBRIDGE"
    with pytest.raises(vdds.RegistryError):
        vdds.register(b"", vdds.BvsEntry("PMSBRIDGE", "Brücke \u4e2d", "x", "1", "x", "1234", "1.4"))
    no_index = vdds.register(b"[PVS]\r\nNAME1=Z1", ENTRY)
    assert no_index.startswith(b"[BVS]\r\nNAME1=PMSBRIDGE\r\n\r\n[PVS]\r\nNAME1=Z1\r\n")


MMI_OTHERS = (
    "[BVS]\r\nNAME1=SIDEXIS\r\n\r\n[SIDEXIS]\r\nNAME=Sidexis Röntgen\r\nMMOVIEW=C:\\SIDEXIS\\VIEW.EXE\r\n"
)


@pytest.mark.parametrize(
    ("bom", "codec"),
    [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"), (b"\xef\xbb\xbf", "utf-8"), (b"", "cp1252")],
)
def test_register_edits_the_file_in_its_own_encoding(bom: bytes, codec: str) -> None:
    original = bom + MMI_OTHERS.encode(codec)
    registered = vdds.register(original, ENTRY)
    assert registered.startswith(bom + "[BVS]\r\nNAME1=SIDEXIS\r\nNAME2=PMSBRIDGE\r\n".encode(codec))
    text = registered[len(bom) :].decode(codec)  # strict: one encoding throughout
    assert text.startswith("[BVS]") and "\ufeff" not in text
    sections = parse_ini(text)
    assert sections["SIDEXIS"].get("NAME") == "Sidexis Röntgen"
    assert sections["PMSBRIDGE"].get("MMOVIEW") == ENTRY.command
    assert vdds.register(registered, ENTRY) == registered
    assert vdds.unregister(registered, "PMSBRIDGE") == original


def test_register_keeps_undefined_bytes_and_refuses_a_file_it_cannot_read_back() -> None:
    odd = b"[BVS]\r\nNAME1=X\x81Y\r\n"  # 0x81 is not a cp1252 character, but it is another entry's byte
    assert vdds.unregister(vdds.register(odd, ENTRY), "PMSBRIDGE") == odd
    truncated = b"\xff\xfe" + "[BVS]\r\nNAME1=SIDEXIS\r\n".encode("utf-16-le") + b"\x00"  # odd length
    with pytest.raises(vdds.RegistryError, match="not valid UTF-16-LE with BOM"):
        vdds.register(truncated, ENTRY)
    with pytest.raises(vdds.RegistryError):
        vdds.unregister(truncated, "PMSBRIDGE")
    with pytest.raises(vdds.RegistryError, match="cannot be written in cp1252"):
        vdds.register(b"[BVS]\r\n", vdds.BvsEntry("P", "\u4e2d", "x", "1", "x", "1", "1"))
    cjk = vdds.register(b"\xef\xbb\xbf[BVS]\r\n", vdds.BvsEntry("P", "\u4e2d", "x", "1", "x", "1", "1"))
    assert parse_ini(cjk.decode("utf-8-sig"))["P"].get("NAME") == "\u4e2d"  # UTF-8 holds it


def test_push_target() -> None:
    registry = (SAMPLES / "VDDS_MMI.INI").read_bytes()
    target = vdds.push_target(registry, "cgm_z1")
    assert target == vdds.PushTarget("PVS_ARCHIV", r"C:\CGM\ARCHIV\MmoInfIm.exe", False)
    assert vdds.push_target(registry, "UNKNOWN") is None
    assert vdds.push_target(registry, "CGM_Z1 ") == target  # the archive section of the [PVS] index serves it
    own = b"[PVS]\nNAME1=P\n[P]\nMMOINFIMPORT=C:\\P\\IMP.EXE -x\nDIRECTIMAGEIMPORT=1\n"
    assert vdds.push_target(own, "P") == vdds.PushTarget("P", "C:\\P\\IMP.EXE -x", True)


def test_the_vdds_field_limits_are_the_stores() -> None:
    """protocols.vdds keeps its own limits (the launch module must not import the store's models to
    refuse a long value in German); they must be the store's, or a value would pass one and fail the
    other (refused late in English, or cut nowhere but refused needlessly)."""
    from bridge.store.limits import TEXT_RULES

    store_name = {"PATID": "pms_id", "PVS": "pms_system", "PRXNR": "practice_id"}
    for key, limit in vdds.LIMITS.items():
        if key == "MMOID":  # our image id, a number: no stored text
            continue
        assert limit == TEXT_RULES[store_name.get(key, key)].limit, key
