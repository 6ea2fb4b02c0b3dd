"""Tooth numbers and their DICOM codes: ISO 3950 / FDI numbers <-> SNOMED CT concepts of CID 4018/4019.

Intra-oral images name the imaged teeth in the Primary Anatomic Structure Sequence with SNOMED CT codes of
CID 4018 (permanent dentition) and CID 4019 (deciduous dentition); the store and the PMSs speak FDI numbers
(11-48, 51-85). Import reads codes into FDI numbers, export writes FDI numbers back as codes, both through
the tables below.

The tables are data from the DICOM standard (PS3.16, as shipped with pydicom 3.0's concept dictionaries)
written out here, so that nothing at run time depends on a library's private modules; `test_dicom_teeth`
holds them against those dictionaries. LEGACY maps the codes older files carry: SNOMED RT (SRT, also
written SNM3) codes T-54210 ... T-54800, and the SNOMED CT codes earlier editions of CID 4018 used before
the "permanent ..." concepts replaced them. Export writes only the current codes.
"""

from __future__ import annotations

from collections.abc import Iterable

# FDI number -> (SNOMED CT code value, code meaning): CID 4018, permanent dentition.
PERMANENT: dict[int, tuple[str, str]] = {
    11: ("422653006", "Permanent maxillary right central incisor tooth"),
    12: ("424877001", "Permanent maxillary right lateral incisor tooth"),
    13: ("860767006", "Permanent maxillary right canine tooth"),
    14: ("57826002", "Permanent maxillary right first premolar tooth"),
    15: ("36492000", "Permanent maxillary right second premolar tooth"),
    16: ("865995000", "Permanent maxillary right first molar tooth"),
    17: ("863902006", "Permanent maxillary right second molar tooth"),
    18: ("68085002", "Permanent maxillary right third molar tooth"),
    21: ("424399000", "Permanent maxillary left central incisor tooth"),
    22: ("423185002", "Permanent maxillary left lateral incisor tooth"),
    23: ("860780009", "Permanent maxillary left canine tooth"),
    24: ("61897005", "Permanent maxillary left first premolar tooth"),
    25: ("23226009", "Permanent maxillary left second premolar tooth"),
    26: ("865988009", "Permanent maxillary left first molar tooth"),
    27: ("863901004", "Permanent maxillary left second molar tooth"),
    28: ("87704003", "Permanent maxillary left third molar tooth"),
    31: ("425106001", "Mandibular left central incisor tooth"),
    32: ("423331005", "Mandibular left lateral tooth"),
    33: ("860782001", "Mandibular left canine tooth"),
    34: ("2400006", "Mandibular left first premolar tooth"),
    35: ("24573005", "Mandibular left second premolar tooth"),
    36: ("866006002", "Mandibular left first molar tooth"),
    37: ("863898000", "Mandibular left second molar tooth"),
    38: ("74344005", "Mandibular left third molar tooth"),
    41: ("424575004", "Mandibular right central incisor tooth"),
    42: ("423937004", "Mandibular right lateral incisor tooth"),
    43: ("860785004", "Mandibular right canine tooth"),
    44: ("80140008", "Mandibular right first premolar tooth"),
    45: ("8873007", "Mandibular right second premolar tooth"),
    46: ("866005003", "Mandibular right first molar tooth"),
    47: ("863899008", "Mandibular right second molar tooth"),
    48: ("38994002", "Mandibular right third molar tooth"),
}

# FDI number -> (SNOMED CT code value, code meaning): CID 4019, deciduous dentition.
DECIDUOUS: dict[int, tuple[str, str]] = {
    51: ("88824007", "Deciduous maxillary right central incisor tooth"),
    52: ("65624003", "Deciduous maxillary right lateral incisor tooth"),
    53: ("30618001", "Deciduous maxillary right canine tooth"),
    54: ("17505006", "Deciduous maxillary right first molar tooth"),
    55: ("27855007", "Deciduous maxillary right second molar tooth"),
    61: ("51678005", "Deciduous maxillary left central incisor tooth"),
    62: ("43622005", "Deciduous maxillary left lateral incisor tooth"),
    63: ("73937000", "Deciduous maxillary left canine tooth"),
    64: ("45234009", "Deciduous maxillary left first molar tooth"),
    65: ("51943008", "Deciduous maxillary left second molar tooth"),
    71: ("89552004", "Deciduous mandibular left central incisor tooth"),
    72: ("14770005", "Deciduous mandibular left lateral incisor tooth"),
    73: ("43281008", "Deciduous mandibular left canine tooth"),
    74: ("38896004", "Deciduous mandibular left first molar tooth"),
    75: ("49330006", "Deciduous mandibular left second molar tooth"),
    81: ("67834006", "Deciduous mandibular right central incisor tooth"),
    82: ("22445006", "Deciduous mandibular right lateral incisor tooth"),
    83: ("6062009", "Deciduous mandibular right canine tooth"),
    84: ("58646007", "Deciduous mandibular right first molar tooth"),
    85: ("61868007", "Deciduous mandibular right second molar tooth"),
}

# (coding scheme, code value) of older files -> FDI number.
LEGACY: dict[tuple[str, str], int] = {
    ("SCT", "22120004"): 11,
    ("SRT", "T-54280"): 11,
    ("SRT", "T-54282"): 11,
    ("SCT", "11712009"): 12,
    ("SRT", "T-54270"): 12,
    ("SRT", "T-54272"): 12,
    ("SCT", "80647007"): 13,
    ("SRT", "T-54260"): 13,
    ("SRT", "T-54250"): 14,
    ("SRT", "T-54240"): 15,
    ("SCT", "5140004"): 16,
    ("SRT", "T-54230"): 16,
    ("SCT", "7121006"): 17,
    ("SRT", "T-54220"): 17,
    ("SRT", "T-54210"): 18,
    ("SCT", "31982000"): 21,
    ("SRT", "T-54290"): 21,
    ("SRT", "T-54292"): 21,
    ("SCT", "25748002"): 22,
    ("SRT", "T-54300"): 22,
    ("SRT", "T-54302"): 22,
    ("SCT", "72876007"): 23,
    ("SRT", "T-54310"): 23,
    ("SRT", "T-54320"): 24,
    ("SRT", "T-54330"): 25,
    ("SCT", "23427002"): 26,
    ("SRT", "T-54340"): 26,
    ("SCT", "66303006"): 27,
    ("SRT", "T-54350"): 27,
    ("SRT", "T-54360"): 28,
    ("SCT", "113278005"): 31,
    ("SRT", "T-54440"): 31,
    ("SRT", "T-54442"): 31,
    ("SCT", "77130001"): 32,
    ("SRT", "T-54430"): 32,
    ("SRT", "T-54432"): 32,
    ("SCT", "39844006"): 33,
    ("SRT", "T-54420"): 33,
    ("SRT", "T-54410"): 34,
    ("SRT", "T-54400"): 35,
    ("SCT", "89625000"): 36,
    ("SRT", "T-54390"): 36,
    ("SCT", "48402004"): 37,
    ("SRT", "T-54380"): 37,
    ("SRT", "T-54370"): 38,
    ("SCT", "15422005"): 41,
    ("SRT", "T-54450"): 41,
    ("SRT", "T-54452"): 41,
    ("SCT", "82628004"): 42,
    ("SRT", "T-54460"): 42,
    ("SRT", "T-54462"): 42,
    ("SCT", "47055002"): 43,
    ("SRT", "T-54470"): 43,
    ("SRT", "T-54480"): 44,
    ("SRT", "T-54490"): 45,
    ("SCT", "28480000"): 46,
    ("SRT", "T-54500"): 46,
    ("SCT", "40005008"): 47,
    ("SRT", "T-54510"): 47,
    ("SRT", "T-54520"): 48,
    ("SCT", "245620002"): 51,
    ("SRT", "T-54610"): 51,
    ("SRT", "T-54611"): 51,
    ("SCT", "245619008"): 52,
    ("SRT", "T-54620"): 52,
    ("SRT", "T-54621"): 52,
    ("SRT", "T-54630"): 53,
    ("SCT", "245616001"): 54,
    ("SRT", "T-54640"): 54,
    ("SRT", "T-54641"): 54,
    ("SRT", "T-54650"): 55,
    ("SRT", "T-54660"): 61,
    ("SRT", "T-54670"): 62,
    ("SRT", "T-54680"): 63,
    ("SRT", "T-54690"): 64,
    ("SRT", "T-54700"): 65,
    ("SRT", "T-54760"): 71,
    ("SRT", "T-54770"): 72,
    ("SCT", "245639007"): 73,
    ("SRT", "T-54780"): 73,
    ("SRT", "T-54781"): 73,
    ("SRT", "T-54790"): 74,
    ("SRT", "T-54800"): 75,
    ("SRT", "T-54710"): 81,
    ("SRT", "T-54720"): 82,
    ("SRT", "T-54730"): 83,
    ("SCT", "245631005"): 84,
    ("SRT", "T-54740"): 84,
    ("SRT", "T-54741"): 84,
    ("SRT", "T-54750"): 85,
}

SCT = "SCT"
# Scheme designators of the legacy SNOMED RT / SNOMED 3 codes (the same code values).
_LEGACY_SCHEMES = {"SRT": "SRT", "SNM3": "SRT", "99SDM": "SRT"}

CODES: dict[int, tuple[str, str]] = {**PERMANENT, **DECIDUOUS}
_BY_CODE: dict[tuple[str, str], int] = {
    **LEGACY,
    **{(SCT, value): number for number, (value, _meaning) in CODES.items()},
}

# Codes for the anatomic region of an intra-oral image (CID 4016): (value, scheme, meaning).
MAXILLA = ("70925003", SCT, "Maxilla")
MANDIBLE = ("91609006", SCT, "Mandible")
JAW_REGION = ("661005", SCT, "Jaw region")
_UPPER_QUADRANTS = frozenset({1, 2, 5, 6})
_RIGHT_QUADRANTS = frozenset({1, 4, 5, 8})


def is_fdi(number: int) -> bool:
    """True for an FDI tooth number: 11-18 ... 41-48 (permanent), 51-55 ... 81-85 (deciduous)."""
    return number in CODES


def fdi_for_code(scheme: str, value: str) -> int | None:
    """The FDI number a coded tooth means, or None for a code that is not a tooth of CID 4018/4019."""
    scheme = scheme.strip().upper()
    scheme = _LEGACY_SCHEMES.get(scheme, scheme)
    return _BY_CODE.get((scheme, value.strip()))


def code_for_fdi(number: int) -> tuple[str, str, str]:
    """(code value, coding scheme, code meaning) of an FDI tooth number; KeyError for other numbers."""
    value, meaning = CODES[number]
    return value, SCT, meaning


def laterality(teeth: Iterable[int]) -> str:
    """Image Laterality of an intra-oral image of these teeth: R, L, or B when both sides show."""
    sides = {"R" if number // 10 in _RIGHT_QUADRANTS else "L" for number in teeth}
    return sides.pop() if len(sides) == 1 else "B"


def region(teeth: Iterable[int]) -> tuple[str, str, str]:
    """The anatomic region (CID 4016) holding these teeth: maxilla, mandible, or the jaw region."""
    jaws = {number // 10 in _UPPER_QUADRANTS for number in teeth}
    if jaws == {True}:
        return MAXILLA
    if jaws == {False}:
        return MANDIBLE
    return JAW_REGION
