"""The integrity check of an imported file's pixel data, and the facts stored with the image.

Compressed pixel data is decoded completely: only a decoder finds a damaged codestream. Uncompressed
(native) grey pixel data is checked without a decode, because for native data a decode checks nothing
more: pydicom's decoder compares the Pixel Data element's length with Rows x Columns x Samples per Pixel
x Number of Frames x Bits Allocated / 8 (plus the padding byte of an odd length), refuses it when
shorter, and then only re-arranges bytes. The same comparison is made here, on the header the import has
parsed anyway, with the element's length as the file holds it (that the file holds all of it is checked
when the header is read). This saves a second parse of the file and a pass over its pixels, which were
most of an import's work per file (docs/dicom.md). Native colour data is decoded, because whether an RGB
image is grey is decided from its pixels.
"""

from __future__ import annotations

from typing import Any

from bridge.dicom import UNDEFINED_LENGTH
from bridge.dicom.read import DicomFile
from bridge.imaging.analyze import (
    Analysis,
    ImagingError,
    analyze_dicom,
    analyze_native_grey,
    native_grey,
)

_PIXEL_DATA = 0x7FE00010


def check(file: DicomFile) -> Analysis:
    """The facts of a file whose pixel data is complete; ImagingError with the reason when it is not."""
    native = native_grey(file.dataset)
    pixel_data = _pixel_data(file) if native is not None else None
    if native is not None and pixel_data is not None:
        expected = native.length
        if len(pixel_data) < expected + expected % 2 and len(pixel_data) != expected:
            raise ImagingError(
                f"corrupt or truncated DICOM pixel data: {len(pixel_data)} bytes where Rows, Columns,"
                f" Number of Frames and Bits Allocated declare {expected}"
            )
        analysis = analyze_native_grey(file.dataset, native, pixel_data)
        if analysis is not None:
            return analysis
    return analyze_dicom(bytes(file.data))  # decoded completely: the copy is a small part of that


def _pixel_data(file: DicomFile) -> memoryview | None:
    """The Pixel Data element's value as the file holds it, without copying it (None when its length
    is undefined, which native data does not allow: the decode refuses it)."""
    element: Any = file.dataset.get_item(_PIXEL_DATA, keep_deferred=True)
    if not getattr(element, "is_raw", False):  # converted already: its value is the bytes, if any
        value = getattr(element, "value", None)
        return memoryview(value) if isinstance(value, bytes) else None
    if element.length == UNDEFINED_LENGTH:
        return None
    if element.value is None:  # deferred: it is still in the file's bytes
        start = element.value_tell
        return memoryview(file.data)[start : start + element.length]
    return memoryview(element.value)
