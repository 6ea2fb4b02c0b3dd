"""The fast reader of uncompressed DICOM headers (bridge.dicom.header) against pydicom's own `dcmread`:
the same objects for every file it reads, and pydicom's reader for every file it leaves alone."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from bridge.dicom import header, read
from tests.support.dicomfiles import code, dental_dataset, intraoral_object, sample, to_bytes

DEFER = read._DEFER_BYTES
PATIENT_ID = 0x00100020


def _dcmread(data: bytes) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(header.ViewReader(memoryview(data)), defer_size=DEFER)


def _plain(data: bytes) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return header.read_plain(memoryview(data), DEFER)


def _assert_same(ours: Any, theirs: Any) -> None:
    """Element by element as the file holds them (raw, deferred values not read), then what pydicom
    records of how the file was encoded."""
    assert list(ours.keys()) == list(theirs.keys())
    for tag in theirs.keys():  # noqa: SIM118 - a Dataset's own iteration converts raw elements
        assert ours.get_item(tag, keep_deferred=True) == theirs.get_item(tag, keep_deferred=True), tag
    assert ours.file_meta == theirs.file_meta
    assert list(ours.file_meta.keys()) == list(theirs.file_meta.keys())
    assert ours.preamble == theirs.preamble
    assert ours.original_encoding == theirs.original_encoding
    assert ours.file_meta.original_encoding == theirs.file_meta.original_encoding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # samples hold invalid values on purpose
        assert ours == theirs  # every element converted, sequences' items too


def _samples() -> list[str]:
    """Every Part 10 file of pydicom's samples and of pydicom-data."""
    found = []
    for path in get_testdata_files():
        if os.path.isfile(path):
            with open(path, "rb") as file:
                if file.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


def test_every_sample_it_reads_gives_what_pydicom_gives_and_the_others_are_left_to_pydicom() -> None:
    read_plain = 0
    for path in _samples():
        data = Path(path).read_bytes()
        ours = _plain(data)
        if ours is None:
            continue
        read_plain += 1
        _assert_same(ours, _dcmread(data))
    assert read_plain >= 100  # 146 of the 230 Part 10 files with pydicom 3.0 and pydicom-data


def test_the_mapping_of_a_file_it_reads_is_the_mapping_pydicom_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = to_bytes(intraoral_object(PatientName="Müller^Jörg", InstitutionName="Praxis, Köln"))
    assert _plain(data) is not None
    ours = read.parse(memoryview(data), "f.dcm", "f.dcm", PATIENT_ID)[1]
    monkeypatch.setattr(header, "read_plain", lambda _data, _defer: None)
    theirs = read.parse(memoryview(data), "f.dcm", "f.dcm", PATIENT_ID)[1]
    assert ours == theirs
    assert ours.demographics.last_name == "Müller" and ours.tooth_numbers == (12,)


def _undefined_length_sequences(ds: Dataset) -> Dataset:
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
    return ds


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
def test_sequences_of_undefined_length_nested_or_empty(implicit: bool) -> None:
    outer = code("T-11170", "SRT", "Maxilla")
    outer.AnatomicRegionModifierSequence = Sequence([code("7771000", "SCT", "Left")])
    ds = intraoral_object()
    ds.AnatomicRegionSequence = Sequence([outer])
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    data = to_bytes(_undefined_length_sequences(ds))
    assert b"\xff\xff\xff\xff" in data[: data.index(b"\xe0\x7f\x10\x00")]
    ours = _plain(data)
    assert ours is not None
    _assert_same(ours, _dcmread(data))
    assert ours.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "7771000"


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    group, number = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
        return struct.pack("<HH2sHL", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def _small() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_bytes(dental_dataset())


def _cases() -> dict[str, bytes]:
    """Files this reader leaves to pydicom, each for its reason."""
    small = _small()
    pixel_data = small.index(b"\xe0\x7f\x10\x00")
    explicit_syntax = b"1.2.840.10008.1.2.1\0"
    assert small.count(explicit_syntax) == 1
    declared_implicit = small.replace(explicit_syntax, b"1.2.840.10008.1.2\0\0\0")  # the same length
    private_undefined = _explicit(0x00091010, b"UN", b"")[:-4] + b"\xff\xff\xff\xff"
    return {
        "compressed pixel data": sample("SC_rgb_rle.dcm").read_bytes(),
        "cut inside the pixel data": small[: pixel_data + 100],
        "cut inside an element's header": small[: pixel_data + 5],
        "explicit VR elements where implicit is declared": declared_implicit,
        "an undefined length that is no sequence": small[:pixel_data] + private_undefined,
        "an item delimiter at the top level": small[:pixel_data] + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00",
        "an unknown VR": small[:pixel_data] + _explicit(0x00091010, b"QQ", b"ab") + small[pixel_data:],
    }


CASES = [
    "compressed pixel data",
    "cut inside the pixel data",
    "cut inside an element's header",
    "explicit VR elements where implicit is declared",
    "an undefined length that is no sequence",
    "an item delimiter at the top level",
    "an unknown VR",
]


def test_the_cases_are_all_named() -> None:
    assert sorted(_cases()) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_what_it_does_not_read_exactly_as_pydicom_is_left_to_pydicom(case: str) -> None:
    data = _cases()[case]
    assert _plain(data) is None


def test_values_it_converts_equal_pydicoms_for_every_simple_element_of_every_sample() -> None:
    """US, CS, UI, IS and DS elements of all samples: `header.value` on a dataset as read gives what
    pydicom's own conversion gives (int for IS, float for DSfloat, str for UID compare equal)."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    converted_here = 0
    for path in _samples():
        data = Path(path).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, theirs = _dcmread(data), _dcmread(data)
            for element in list(theirs.values()):
                keyword = keyword_for_tag(element.tag)
                vr = element.VR or (dictionary_VR(element.tag) if keyword else None)
                if not keyword or vr not in ("US", "CS", "UI", "IS", "DS"):
                    continue
                assert header.value(ours, keyword, None) == theirs.get(keyword), (path, keyword)
                raw = ours.get_item(element.tag, keep_deferred=True)
                converted_here += bool(getattr(raw, "is_raw", False))  # not converted by pydicom since
    assert converted_here >= 1000  # 4643 with pydicom 3.0 and pydicom-data


def test_a_missing_attribute_without_a_default_raises_as_pydicom_does() -> None:
    ds = _dcmread(_small())
    del ds.Rows
    with pytest.raises(AttributeError, match="Rows"):
        header.value(ds, "Rows")
    assert header.value(ds, "Rows", 7) == 7


def test_a_damaged_sequence_or_a_changed_pydicom_leaves_the_file_to_dcmread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails in this reader is `dcmread`'s to read and to name: the same error as before it, and
    a pydicom release whose reader objects changed only makes the import slower."""
    ds = intraoral_object()
    data = to_bytes(_undefined_length_sequences(ds))
    start = data.index(b"\xfe\xff\x00\xe0")  # the first item of the first sequence
    damaged = data[: start + 20]  # cut inside it: pydicom's read_sequence fails
    assert _plain(damaged) is None
    with pytest.raises(read.DicomError) as ours:
        read.parse(memoryview(damaged), "f.dcm", "f.dcm", PATIENT_ID)
    monkeypatch.setattr(header, "read_plain", lambda _data, _defer: None)
    with pytest.raises(read.DicomError) as theirs:
        read.parse(memoryview(damaged), "f.dcm", "f.dcm", PATIENT_ID)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith("truncated or corrupt DICOM header")
    monkeypatch.undo()

    import pydicom.dataelem

    def changed(*_args: object) -> None:
        raise TypeError("RawDataElement() takes other arguments in this release")

    monkeypatch.setattr(pydicom.dataelem, "RawDataElement", changed)
    assert _plain(data) is None
    assert read.parse(memoryview(data), "f.dcm", "f.dcm", PATIENT_ID)[1].tooth_numbers == (12,)
