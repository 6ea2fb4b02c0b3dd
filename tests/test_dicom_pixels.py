"""The integrity check of imported pixel data: native grey data by its length, the rest by a decode.

The check without a decode must describe a file exactly as the decode does (`analyze_dicom`), and refuse what
pydicom's decoder refuses: pixel data shorter than the header declares.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.dicom import pixels, read
from bridge.imaging.analyze import ImagingError, analyze_dicom
from tests.support.dicomfiles import dental_dataset, sample, to_bytes, write

PATIENT_ID = 0x00100020
DEEP = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 37) % 4096
WIDE = (np.arange(20 * 1600, dtype=np.uint16).reshape(20, 1600) * 3) % 4096
FRAMES = np.stack([DEEP, DEEP[::-1]]).reshape(2 * 40, 30)  # two frames of 40 rows
SHALLOW = (np.arange(5 * 5, dtype=np.uint16).reshape(5, 5) * 9).astype(np.uint8)  # 25 bytes: odd


def read_file(
    tmp_path: Path, pixels_: np.ndarray[Any, Any] | None = None, **attributes: Any
) -> read.DicomFile:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write(dental_dataset(pixels=pixels_, **attributes), tmp_path / "f.dcm")
    return read.read_file(str(path), "f.dcm", PATIENT_ID, 1 << 30)


def read_bytes(tmp_path: Path, data: bytes, name: str = "f") -> read.DicomFile:
    """A file's bytes read as the import reads a file."""
    path = tmp_path / name
    path.write_bytes(data)
    return read.read_file(str(path), name, PATIENT_ID, 1 << 30)


VARIANTS: dict[str, tuple[np.ndarray[Any, Any] | None, dict[str, Any]]] = {
    "12-bit with a window": (DEEP, {"WindowCenter": "2000", "WindowWidth": "4000"}),
    "12-bit, automatic window": (DEEP, {}),
    "12-bit, garbage above BitsStored": (DEEP | np.uint16(0xF000), {}),
    "16-bit stored, rescaled": (DEEP, {"BitsStored": 16, "HighBit": 15, "RescaleSlope": "2"}),
    "MONOCHROME1": (DEEP, {"PhotometricInterpretation": "MONOCHROME1"}),
    "signed with a window": (DEEP, {"PixelRepresentation": 1, "WindowCenter": "0", "WindowWidth": "99"}),
    "signed, automatic window": (DEEP, {"PixelRepresentation": 1}),
    "two frames": (FRAMES, {"NumberOfFrames": 2, "Rows": 40}),
    "8-bit, odd length": (SHALLOW, {}),
    "wide: panoramic by shape": (WIDE, {"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_grey_files_are_described_as_the_full_decode_describes_them(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values, attributes = VARIANTS[variant]
    file = read_file(tmp_path, values, **attributes)
    expected = analyze_dicom(bytes(file.data))  # what the DICOM import's full decode says
    if variant != "signed, automatic window":  # only the decode shifts signed pixels for their window

        def no_decode(data: bytes) -> None:
            raise AssertionError("decoded")

        monkeypatch.setattr(pixels, "analyze_dicom", no_decode)
    before = bytes(file.data)
    assert pixels.check(file) == expected
    assert bytes(file.data) == before  # the bits above BitsStored are masked in a copy, not in the file


@pytest.mark.parametrize(
    "name", ["RG3_UNCI.dcm", "RG1_UNCR.dcm", "SC_rgb.dcm", "JPEG-LL.dcm", "RG3_J2KR.dcm"]
)
def test_real_files_are_described_as_the_full_decode_describes_them(name: str, tmp_path: Path) -> None:
    """Uncompressed grey CR images take the check without a decode; colour and compressed ones are
    decoded. RG1_UNCR's preamble is also a TIFF header: it is described as the DICOM file it was
    imported as."""
    data = sample(name).read_bytes()
    described = pixels.check(read_bytes(tmp_path, data, name))
    assert described == analyze_dicom(data)
    assert described.file_ext == "dcm" and described.media_type == "application/dicom"


def test_native_pixel_data_shorter_than_its_header_declares_is_refused(tmp_path: Path) -> None:
    ds = dental_dataset(pixels=DEEP)
    ds.PixelData = ds.PixelData[:-2]  # one pixel short; the file itself is complete
    with pytest.raises(ImagingError) as caught:
        pixels.check(read_bytes(tmp_path, to_bytes(ds)))
    assert str(caught.value) == (
        "corrupt or truncated DICOM pixel data: 2398 bytes where Rows, Columns, Number of Frames and"
        " Bits Allocated declare 2400"
    )
    odd = dental_dataset(pixels=SHALLOW)
    odd.PixelData = odd.PixelData[:-1]  # 24 bytes for 25 pixels: one byte short
    with pytest.raises(ImagingError, match=r"24 bytes where .* declare 25"):
        pixels.check(read_bytes(tmp_path, to_bytes(odd)))
