"""Mapping one DICOM header onto the store: teeth, capture time, category, character sets, the id tag."""

from __future__ import annotations

import re
import warnings
from datetime import date, datetime
from pathlib import Path
from typing import cast

import pytest
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr._concepts_dict import concepts
from pydicom.sr._snomed_dict import mapping
from pydicom.sr.codedict import codes

from bridge.dicom import read, teeth
from bridge.model import Category, Sex
from tests.support.dicomfiles import dental_dataset, sample, to_bytes, write

PATIENT_ID = 0x00100020


def facts(tmp_path: Path, **attributes: object) -> read.DicomFacts:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some tests write the invalid values real files carry
        path = write(dental_dataset(**attributes), tmp_path / "f.dcm")  # type: ignore[arg-type]
    return read.read_file(str(path), "f.dcm", PATIENT_ID, 1 << 30).facts


def refused(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "f.dcm"
    path.write_bytes(data)
    with pytest.raises(read.DicomError) as caught:
        read.read_file(str(path), "f.dcm", PATIENT_ID, 1 << 30)
    return str(caught.value)


# --------------------------------------------------------------------------------------------------
# The tooth table against the DICOM standard's concepts (pydicom's copy)


def _meanings() -> dict[str, str]:
    entries = cast(dict[str, dict[str, tuple[str, list[int]]]], concepts["SCT"])
    return {code: meaning for entry in entries.values() for code, (meaning, _cids) in entry.items()}


def test_every_permanent_and_deciduous_tooth_has_its_cid_code() -> None:
    for cid, table in ((4018, teeth.PERMANENT), (4019, teeth.DECIDUOUS)):
        collection = getattr(codes, f"cid{cid}")
        in_cid = {(c.value, c.meaning) for c in (getattr(collection, name) for name in collection.dir())}
        assert set(table.values()) == in_cid, f"CID {cid}"
        assert len(cid_concepts[cid]["SCT"]) == len(table)
    assert sorted(teeth.PERMANENT) == [q * 10 + t for q in (1, 2, 3, 4) for t in range(1, 9)]
    assert sorted(teeth.DECIDUOUS) == [q * 10 + t for q in (5, 6, 7, 8) for t in range(1, 6)]


@pytest.mark.parametrize(
    ("meaning", "number"),
    [
        ("Permanent maxillary right central incisor tooth", 11),
        ("Permanent maxillary left second premolar tooth", 25),
        ("Mandibular left third molar tooth", 38),
        ("Mandibular right canine tooth", 43),
        ("Deciduous maxillary right second molar tooth", 55),
        ("Deciduous mandibular left canine tooth", 73),
    ],
)
def test_fdi_numbers_follow_the_code_meanings(meaning: str, number: int) -> None:
    value, scheme, written = teeth.code_for_fdi(number)
    assert (scheme, written) == ("SCT", meaning)
    assert teeth.fdi_for_code("SCT", value) == number


def test_legacy_snomed_rt_codes_map_through_the_standards_srt_to_sct_table() -> None:
    meanings = _meanings()
    assert len([key for key in teeth.LEGACY if key[0] == "SRT"]) == 65
    for (scheme, value), number in teeth.LEGACY.items():
        sct = mapping["SRT"][value] if scheme == "SRT" else value
        meaning = meanings[sct].lower()
        jaw = "maxillary" if number // 10 in (1, 2, 5, 6) else "mandibular"
        side = "right" if number // 10 in (1, 4, 5, 8) else "left"
        assert re.search(rf"{jaw} {side}", meaning), (value, number, meaning)
        assert ("deciduous" in meaning) == (number > 50), (value, number, meaning)
    assert teeth.fdi_for_code("SRT", "T-54282") == 11
    assert teeth.fdi_for_code("snm3", " T-54260 ") == 13
    assert teeth.fdi_for_code("SCT", "80647007") == 13  # the older SCT concept for tooth 13
    assert teeth.fdi_for_code("SCT", "70925003") is None  # the maxilla is no tooth


def test_laterality_and_region_of_teeth() -> None:
    assert (teeth.laterality([11, 12, 41]), teeth.region([11, 12])) == ("R", teeth.MAXILLA)
    assert (teeth.laterality([21, 36]), teeth.region([36, 75])) == ("L", teeth.MANDIBLE)
    assert (teeth.laterality([11, 21]), teeth.region([16, 46])) == ("B", teeth.JAW_REGION)


# --------------------------------------------------------------------------------------------------
# Header mapping


def test_teeth_from_primary_anatomic_structure_codes(tmp_path: Path) -> None:
    found = facts(
        tmp_path,
        teeth=[
            ("424877001", "SCT", "Permanent maxillary right lateral incisor tooth"),
            ("T-54282", "SRT", "Maxillary right central incisor tooth"),
            ("70925003", "SCT", "Maxilla"),
        ],
    )
    assert found.tooth_numbers == (12, 11)
    assert found.attributes["unmapped_anatomy"] == [
        {"scheme": "SCT", "value": "70925003", "meaning": "Maxilla"}
    ]
    assert found.ingest_metadata()["tooth_numbers"] == (12, 11)


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        (
            {"AcquisitionDateTime": "20230405123456.123+0200", "AcquisitionDate": "20200101"},
            datetime(2023, 4, 5, 12, 34, 56, 123000),
        ),
        ({"AcquisitionDate": "20230405", "AcquisitionTime": "0930"}, datetime(2023, 4, 5, 9, 30)),
        ({"AcquisitionDate": "2023.04.05", "AcquisitionTime": "09:30:15"}, datetime(2023, 4, 5, 9, 30, 15)),
        ({"AcquisitionDateTime": "garbage"}, datetime(2024, 1, 2, 10, 15)),  # falls back to content time
        ({"ContentDate": None, "ContentTime": None}, None),  # never the import time
    ],
)
def test_capture_time_from_acquisition_then_content_time(
    tmp_path: Path, attributes: dict[str, object], expected: datetime | None
) -> None:
    assert facts(tmp_path, **attributes).captured_at == expected


@pytest.mark.parametrize(
    ("sop_class", "modality", "attributes", "category"),
    [
        (read.IO_PRESENTATION, "IO", {}, Category.INTRAORAL_XRAY),
        (read.IO_PROCESSING, "IO", {}, Category.INTRAORAL_XRAY),
        (read.DX_PRESENTATION, "PX", {}, Category.PANORAMIC),
        (read.DX_PRESENTATION, "DX", {"SeriesDescription": "OPG"}, Category.PANORAMIC),
        (
            read.DX_PROCESSING,
            "DX",
            {"ImageType": ["ORIGINAL", "PRIMARY", "CEPHALOMETRIC"]},
            Category.CEPHALOMETRIC,
        ),
        (read.DX_PRESENTATION, "IO", {}, Category.INTRAORAL_XRAY),
        (read.CR_IMAGE, "CR", {}, Category.EXTRAORAL_XRAY),
        (read.CR_IMAGE, "CR", {"ProtocolName": "Ceph lat"}, Category.CEPHALOMETRIC),
        (read.SECONDARY_CAPTURE, "XC", {}, Category.PHOTO),
        (read.SECONDARY_CAPTURE, "OT", {}, Category.DOCUMENT),
        (read.SECONDARY_CAPTURE, "PX", {}, Category.PANORAMIC),
        (read.MF_GREY_WORD_SC, "CT", {"NumberOfFrames": "1"}, Category.CBCT),
        (read.VL_PHOTOGRAPHIC, "XC", {}, Category.PHOTO),
        (read.CT_IMAGE, "CT", {}, Category.CBCT),
    ],
)
def test_category_from_sop_class_then_modality_then_labels(
    tmp_path: Path, sop_class: str, modality: str, attributes: dict[str, object], category: Category
) -> None:
    assert facts(tmp_path, sop_class=sop_class, modality=modality, **attributes).category is category


def test_a_colour_secondary_capture_is_a_photo(tmp_path: Path) -> None:
    import numpy as np

    rgb = np.zeros((8, 8, 3), np.uint8)
    assert (
        facts(tmp_path, sop_class=read.SECONDARY_CAPTURE, modality="OT", pixels=rgb).category
        is Category.PHOTO
    )


def test_identity_demographics_uids_and_device(tmp_path: Path) -> None:
    found = facts(
        tmp_path, patient_id=" 00042 ", name="van der Berg^Anna Maria^^Dr.", sex="F", birth_date="19791231"
    )
    assert found.pms_id == "00042"
    demo = found.demographics
    assert (demo.last_name, demo.first_name, demo.title) == ("van der Berg", "Anna Maria", "Dr.")
    assert (demo.birth_date, demo.sex) == (date(1979, 12, 31), Sex.FEMALE)
    assert found.device == "Acme Sensor 2"
    assert found.frames == 1 and found.modality == "IO"


@pytest.mark.parametrize(
    ("charset", "name", "expected"),
    [
        ("ISO_IR 100", "Müller^Jürgen", ("Müller", "Jürgen")),
        ("ISO_IR 192", "Müller^Jürgen", ("Müller", "Jürgen")),
        ("ISO_IR 192", "Łukasiewicz^Zoë", ("Łukasiewicz", "Zoë")),
        (None, "Smith^John", ("Smith", "John")),
    ],
)
def test_names_in_the_accepted_character_sets(
    tmp_path: Path, charset: str | None, name: str, expected: tuple[str, str]
) -> None:
    demo = facts(tmp_path, charset=charset, name=name).demographics
    assert (demo.last_name, demo.first_name) == expected


def test_a_file_that_mislabels_its_character_set_is_refused(tmp_path: Path) -> None:
    latin = to_bytes(dental_dataset(charset="ISO_IR 100", name="Müller^Hans"))
    assert latin.count(b"ISO_IR 100") == 1
    mislabelled = latin.replace(b"ISO_IR 100", b"ISO_IR 192")  # declares UTF-8, holds Latin-1
    assert refused(tmp_path, mislabelled) == (
        "PatientName (0010,0010) is not valid ISO_IR 192 text, as the file's Specific Character Set declares"
        " (the sending device mislabels its character set)"
    )


def test_other_character_sets_are_refused(tmp_path: Path) -> None:
    polish = to_bytes(dental_dataset(charset="ISO_IR 100", name="Nowak^Jan")).replace(
        b"ISO_IR 100", b"ISO_IR 101"
    )
    assert (
        refused(tmp_path, polish)
        == "unsupported character set ISO_IR 101 (accepted: ISO_IR 6, ISO_IR 100, ISO_IR 192)"
    )


def test_the_id_tag_is_configurable_and_checked(tmp_path: Path) -> None:
    assert read.resolve_id_tag("PatientID") == (PATIENT_ID, "PatientID")
    assert read.resolve_id_tag("0010,1000") == (0x00101000, "OtherPatientIDs")
    with pytest.raises(ValueError, match="no such DICOM attribute"):
        read.resolve_id_tag("PatientIdentifier")
    with pytest.raises(ValueError, match="its VR DA cannot hold an id"):
        read.resolve_id_tag("PatientBirthDate")
    path = write(dental_dataset(AccessionNumber="ACC-7"), tmp_path / "a.dcm")
    assert read.read_file(str(path), "a", 0x00080050, 1 << 30).facts.pms_id == "ACC-7"


def test_an_id_or_uid_with_a_second_value_is_refused_not_cut_to_its_first(tmp_path: Path) -> None:
    """PatientID "0042\\0043" must not become patient 0042: refusing is the only safe reading."""
    two_ids = to_bytes(dental_dataset(patient_id="0042\\0043"))
    assert (
        refused(tmp_path, two_ids)
        == "PatientID (0010,0020) holds 2 values ('0042', '0043'); it must hold one"
    )
    study = "1.2.826.0.1.3680043.8.498.1"
    two_studies = to_bytes(dental_dataset(study_uid=f"{study}\\{study}.2"))
    assert refused(tmp_path, two_studies).startswith("StudyInstanceUID (0020,000D) holds 2 values")
    path = write(dental_dataset(OtherPatientIDs=["P-7", "P-8"]), tmp_path / "o.dcm")  # VM 1-n: the first
    assert read.read_file(str(path), "o", 0x00101000, 1 << 30).facts.pms_id == "P-7"
    assert facts(tmp_path, patient_id="0042 ").pms_id == "0042"  # the padding DICOM adds is no second value


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (
            "image_dfl.dcm",
            "unsupported transfer syntax Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99)",
        ),
        ("ExplVR_BigEnd.dcm", "unsupported transfer syntax Explicit VR Big Endian (1.2.840.10008.1.2.2)"),
        ("rtdose.dcm", "unsupported SOP class RT Dose Storage (1.2.840.10008.5.1.4.1.1.481.2)"),
        ("no_meta.dcm", "not a DICOM file (no DICM marker after the 128-byte preamble)"),
    ],
)
def test_unsupported_files_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(read.DicomError) as caught:
        read.read_file(str(sample(name)), name, PATIENT_ID, 1 << 30)
    assert str(caught.value).startswith(reason)


def test_a_dicomdir_named_as_a_file_inside_a_walked_folder_is_skipped_not_refused() -> None:
    with pytest.raises(read.NotAnImage):
        read.read_file(
            str(sample("CT_small.dcm").parent / "dicomdirtests" / "DICOMDIR"), "d", PATIENT_ID, 1 << 30
        )


def test_the_dicom_settings_have_working_defaults_and_refuse_a_bad_tag(tmp_path: Path) -> None:
    from bridge.config import ConfigError, load_settings

    config = tmp_path / "pms-bridge.ini"
    config.write_text("[api]\ntoken = x\n", encoding="utf-8")
    dicom = load_settings(str(config)).dicom
    assert (dicom.pms_system, dicom.patient_id_tag, dicom.render_at_import) == ("dicom", "PatientID", False)
    config.write_text("[dicom]\npatient_id_tag = (0010,1000)\n", encoding="utf-8")
    assert load_settings(str(config)).dicom.patient_id_tag == "0010,1000"
    config.write_text("[dicom]\npatient_id_tag = Patient ID!\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match="patient_id_tag = 'Patient ID!' is not allowed; allowed: a DICOM keyword"
    ):
        load_settings(str(config))
