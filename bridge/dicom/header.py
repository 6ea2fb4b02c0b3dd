"""The header of an uncompressed DICOM file read without pydicom's file reader, into the same objects.

Why: an import spends most of its CPU per file on work that cannot shrink (the SHA-256 of the bytes, their
copy, the direct write); of the rest, pydicom's `dcmread` was the largest part, about 0.3 ms of a 3 MB
X-ray's header of some sixty elements, mostly its general machinery per element (a file-like object read
in small pieces, callbacks, options this import never uses). This reader walks the elements of the bytes
already in memory and builds the very objects `dcmread` builds (a FileDataset of RawDataElements, the
file meta as a FileMetaDataset, the same original encoding), so everything after it, the mapping onto the
store and the checks of bridge.dicom.read, runs unchanged on either. Measured in docs/dicom.md.

It reads only what it can read exactly as pydicom does, and answers None for anything else, which the
caller then gives to `dcmread` as before: a transfer syntax other than implicit or explicit VR little
endian (compressed pixel data is decoded completely anyway, which dwarfs its header), a file whose
elements disagree with its transfer syntax (pydicom switches between implicit and explicit VR there), an
element or value cut off by the end of the file, an unknown VR, an item delimiter at the top level, an
undefined length on anything but a sequence. Sequences of undefined length are read by pydicom's own
`read_sequence`, as `dcmread` does; sequences of defined length stay raw, converted when first used.
Anything that fails here (a damaged sequence, a pydicom release whose reader objects changed: it builds
pydicom 3's) goes to `dcmread` too, which says what is wrong as it did before this reader existed; the
tests compare both readers over every sample file, so such a release fails them rather than importing
differently.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any, BinaryIO, cast

from bridge.dicom import EXPLICIT_LE, IMPLICIT_LE, UNDEFINED_LENGTH

_META_START = 132  # after the 128-byte preamble and "DICM"
_SPECIFIC_CHARACTER_SET = 0x00080005
_TAG_AND_LENGTH = struct.Struct("<HHL")  # implicit VR: group, element, 32-bit length
_TAG_VR_LENGTH = struct.Struct("<HH2sH")  # explicit VR: group, element, VR, 16-bit length
_LONG_LENGTH = struct.Struct("<L")  # explicit VR with a 32-bit length


class ViewReader:
    """A read-only file over a memoryview, for pydicom: `io.BytesIO` would copy the whole file (the
    pixel data too) only to read its header. About 0.1 ms more per file than BytesIO's C code, against
    a copy of 0.5 ms or more for a 3 MB X-ray."""

    __slots__ = ("_pos", "_view")

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        start = self._pos
        end = len(self._view) if size is None or size < 0 else min(start + size, len(self._view))
        self._pos = max(start, end)
        return bytes(self._view[start:end])

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class _NotPlain(Exception):
    """What this reader does not read exactly as pydicom: the caller uses `dcmread`."""


def read_plain(data: memoryview, defer_size: int) -> Any | None:
    """The FileDataset `pydicom.dcmread(ViewReader(data), defer_size=defer_size)` returns for a DICOM Part
    10 file (the caller checked the "DICM" prefix) of uncompressed data, or None when it is not such a
    file or holds anything this reader leaves to pydicom (see the module doc)."""
    from pydicom.charset import default_encoding
    from pydicom.dataset import FileDataset, FileMetaDataset

    try:
        meta_elements, start = _elements(data, _META_START, False, defer_size, meta=True)
        syntax_element = meta_elements.get(0x00020010)
        syntax = (syntax_element.value or b"").decode("ascii").strip("\0 ") if syntax_element else ""
        if syntax not in (IMPLICIT_LE, EXPLICIT_LE):
            return None
        implicit = syntax == IMPLICIT_LE
        if start + 6 <= len(data):  # pydicom looks at the first element's VR bytes and follows them
            vr = data[start + 4 : start + 6]
            if (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B) == implicit:
                return None
        elements, _end = _elements(data, start, implicit, defer_size, meta=False)
        meta = FileMetaDataset(meta_elements)
        meta.set_original_encoding(False, True, default_encoding)
        ds = FileDataset(ViewReader(data), elements, bytes(data[:128]), meta, implicit, True)
        ds.set_original_encoding(implicit, True, ds._character_set)  # as pydicom's read_partial does
    except Exception:  # _NotPlain; a damaged sequence; a pydicom whose reader objects changed
        return None  # `dcmread` reads it, and says what is wrong, as before this reader
    return ds


def _elements(
    data: memoryview, pos: int, implicit: bool, defer_size: int, *, meta: bool
) -> tuple[dict[Any, Any], int]:
    """The elements from `pos` to the end of the file (the meta group: while the group is 0002), as
    pydicom's data_element_generator yields them, and where they ended."""
    from pydicom.charset import convert_encodings, default_encoding
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
    from pydicom.filereader import ENCODED_VR, read_sequence
    from pydicom.tag import BaseTag
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
    from pydicom.values import convert_string

    size = len(data)
    encoding: str | list[str] = default_encoding
    elements: dict[Any, Any] = {}
    while pos + 8 <= size:
        vr: str | None
        if implicit:
            group, number, length = _TAG_AND_LENGTH.unpack_from(data, pos)
            vr, pos = None, pos + 8
        else:
            group, number, raw_vr, length = _TAG_VR_LENGTH.unpack_from(data, pos)
            if meta and group != 2:
                break
            if raw_vr not in ENCODED_VR:
                raise _NotPlain
            vr, pos = raw_vr.decode("ascii"), pos + 8
            if vr in EXPLICIT_VR_LENGTH_32:
                if pos + 4 > size:
                    raise _NotPlain
                (length,) = _LONG_LENGTH.unpack_from(data, pos)  # after two reserved bytes
                pos += 4
        tag = group << 16 | number
        if (group <= 2 and not meta) or group == 0xFFFE:  # a command, misplaced meta, a delimiter
            raise _NotPlain
        if length == UNDEFINED_LENGTH:
            if vr not in ("SQ", None) or (vr is None and _dictionary_vr(dictionary_VR, tag) != "SQ"):
                raise _NotPlain
            reader = ViewReader(data)
            reader.seek(pos)
            sequence = read_sequence(cast(BinaryIO, reader), implicit, True, length, encoding)
            elements[BaseTag(tag)] = DataElement(BaseTag(tag), "SQ", sequence, pos, is_undefined_length=True)
            pos = reader.tell()
            continue
        if pos + length > size:
            raise _NotPlain  # cut off: pydicom reads on with a short value or none, and warns
        value: Any
        if length > defer_size and tag != _SPECIFIC_CHARACTER_SET:
            value = None
        elif length:
            value = bytes(data[pos : pos + length])
        else:
            value = empty_value_for_VR(vr, raw=True)
        if tag == _SPECIFIC_CHARACTER_SET:
            encoding = convert_encodings(convert_string(value or b"", True))
        elements[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, pos, implicit, True)
        pos += length
    if pos < size and not (meta and pos + 8 <= size):
        raise _NotPlain  # a few bytes left that are no whole element: pydicom's own reading of them
    return elements, pos


def _dictionary_vr(dictionary_vr: Any, tag: int) -> str | None:
    try:
        return str(dictionary_vr(tag))
    except KeyError:
        return None


# --------------------------------------------------------------------------------------------------
# Values


_ABSENT: Any = object()
_INTEGER = re.compile(r"[+-]?[0-9]{1,12}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def value(ds: Any, keyword: str, default: Any = _ABSENT) -> Any:
    """What `ds.get(keyword, default)` gives (without a default: `getattr(ds, keyword)`), converted here
    when the element is still as read (little endian) and holds one plain value of a VR whose conversion
    is simple (US, CS, UI, IS, DS). pydicom converts an element the first time it is used, at about 13 µs
    each through its dataset's machinery, and describing an uncompressed X-ray uses some twenty: that was
    most of the pixel check's time. Anything else (absent, empty, several values, another VR, a value
    pydicom would warn about) is pydicom's own answer. The numbers come back as int and float, not
    pydicom's IS and DSfloat, which compare and convert the same."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    element = ds.get_item(tag) if tag is not None else None
    if tag is not None and element is not None and getattr(element, "is_raw", False):
        vr = element.VR or _dictionary_vr(dictionary_VR, tag)
        if element.value and element.is_little_endian and vr in _SIMPLE_VRS:
            converted = _simple(vr, element.value)
            if converted is not None:
                return converted
    return getattr(ds, keyword) if default is _ABSENT else ds.get(keyword, default)


_SIMPLE_VRS = frozenset({"US", "CS", "UI", "IS", "DS"})


def _simple(vr: str, raw: bytes) -> int | float | str | None:
    """One value of a simple VR as pydicom converts it; None when it is not that simple."""
    if vr == "US":
        return int.from_bytes(raw, "little") if len(raw) == 2 else None
    text = raw.decode("latin-1")  # pydicom's default encoding for these VRs
    if "\\" in text:
        return None
    if vr == "CS":
        return text.rstrip(" \x00")
    if vr == "UI":
        return text.rstrip("\x00 ")
    text = text.strip(" \x00")
    if vr == "IS":
        return int(text) if _INTEGER.fullmatch(text) else None
    return float(text) if _DECIMAL.fullmatch(text) and len(text) <= 16 else None
