"""One DICOM file's header mapped onto the store: identity, demographics, category, teeth, capture time, UIDs.

What is accepted mirrors DTX Studio Clinic's conformance statement (its tables 3 and 4, plus VL
photographic images from the issue): those SOP classes, those transfer syntaxes, the character sets
ISO-IR 6, ISO-IR 100 and ISO-IR 192. Anything else is refused with the reason, per file.

Text is decoded here, strictly, rather than by pydicom's lenient decoder: a file that declares UTF-8 but
holds Latin-1 bytes (a sender mislabelling its character set, a classic source of "MÃ¼ller") is refused
with that reason instead of storing a garbled name. The default repertoire (no Specific Character Set) is
read as Latin-1, which is what such files hold in practice.

These functions run in the imaging process pool (they parse untrusted bytes and cost CPU). A file is read
once (`read_file`): its header is parsed from the bytes that are then checked, hashed and stored, so
what is described is what is stored. The facts pickle; the bytes stay in the worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

from bridge.dicom import EXPLICIT_LE, IMPLICIT_LE, MEDIA_STORAGE_DIRECTORY, UNDEFINED_LENGTH, header, teeth
from bridge.dicom.fileset import OutsideFolders, open_inside
from bridge.imaging.analyze import DICOM_CATEGORY
from bridge.model import Category, Demographics, Sex
from bridge.store import uncached

# SOP classes read (DTX Studio Clinic's table 3, VL photographic, and our own CT volumes).
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
IO_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.3"
IO_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.3.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MF_GREY_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"
MF_GREY_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"

SOP_CLASSES = {
    CT_IMAGE: "CT Image",
    ENHANCED_CT: "Enhanced CT Image",
    LEGACY_CONVERTED_CT: "Legacy Converted Enhanced CT Image",
    CR_IMAGE: "Computed Radiography Image",
    DX_PRESENTATION: "Digital X-Ray Image For Presentation",
    DX_PROCESSING: "Digital X-Ray Image For Processing",
    IO_PRESENTATION: "Digital Intra-Oral X-Ray Image For Presentation",
    IO_PROCESSING: "Digital Intra-Oral X-Ray Image For Processing",
    SECONDARY_CAPTURE: "Secondary Capture Image",
    MF_GREY_BYTE_SC: "Multi-frame Grayscale Byte Secondary Capture Image",
    MF_GREY_WORD_SC: "Multi-frame Grayscale Word Secondary Capture Image",
    VL_PHOTOGRAPHIC: "VL Photographic Image",
}

_DEFLATED = "1.2.840.10008.1.2.1.99"
TRANSFER_SYNTAXES = {
    IMPLICIT_LE: "Implicit VR Little Endian",
    EXPLICIT_LE: "Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (8-bit)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (12-bit)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, First-Order Prediction",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 (lossless only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
READ_SOP_CLASSES = "the bridge reads CT, CR, DX, intra-oral, secondary capture and VL photographic images"
READ_SYNTAXES = "the bridge reads uncompressed, RLE, JPEG baseline, extended and lossless, and JPEG 2000 data"
# Transfer syntaxes whose pixel data went through lossy compression (JPEG 2000 part 1 may be either;
# it counts as lossy unless the file says otherwise, the cautious reading for diagnosis).
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
}

# Specific Character Set values read, with the codec their text is decoded with.
CHARACTER_SETS = {
    "": "latin_1",  # the default repertoire; such files hold Latin-1 in practice
    "ISO_IR 6": "latin_1",
    "ISO 2022 IR 6": "latin_1",
    "ISO_IR 100": "latin_1",
    "ISO 2022 IR 100": "latin_1",
    "ISO_IR 192": "utf-8",
}
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})  # the VRs the character set governs
ID_VRS = frozenset({"LO", "SH", "CS", "IS", "UC", "UI", "ST"})  # VRs a PMS patient id may come in

MAX_ID_LENGTH = 100  # the store's pms_id column
_DEFER_BYTES = 64 * 1024  # values larger than this (pixel data) are not read to describe a file
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as it is written in a little-endian file

_PANORAMIC_WORDS = frozenset({"PAN", "PANO", "PANORAMIC", "PANORAMA", "OPG", "OPT"})


class DicomError(ValueError):
    """A file cannot be imported; the message is the reason shown to the user for that file.

    `series_uid` names the series of a damaged file when its header still says it: the rest of a CT
    series with a damaged slice must not be stacked into a volume with a gap.
    """

    series_uid = ""


class NotAnImage(DicomError):
    """A DICOM file that is no image to import (a DICOMDIR met in a folder): skipped, not refused."""


@dataclass(frozen=True)
class DicomFacts:
    """What the store needs from one DICOM file, read from its header (the pixels are not decoded)."""

    path: str
    display: str
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str
    pms_id: str
    demographics: Demographics
    category: Category
    captured_at: datetime | None
    tooth_numbers: tuple[int, ...]
    frames: int
    study_description: str
    series_description: str
    series_number: int | None
    device: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ct_slice(self) -> bool:
        """A single-slice CT image: it is stacked with its series into one volume."""
        return self.sop_class_uid == CT_IMAGE and self.frames == 1

    def ingest_metadata(self) -> dict[str, Any]:
        """The keyword arguments `Imaging.ingest` stores with the image (NewImage fields)."""
        return {
            "category": self.category,
            "tooth_numbers": self.tooth_numbers,
            "captured_at": self.captured_at,
            "device": self.device,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "modality": self.modality,
            "study_description": self.study_description,
            "series_description": self.series_description,
            "series_number": self.series_number,
            "attributes": {"dicom_import": self.attributes},
        }


# --------------------------------------------------------------------------------------------------
# Reading


def resolve_id_tag(name: str) -> tuple[int, str]:
    """The tag (as an int) and keyword of the configured patient id attribute; ValueError names why not.

    Runs where the settings are applied (not when they are loaded, which must not import pydicom).
    """
    from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

    if "," in name:
        group, element = name.split(",")
        tag: int | None = int(group, 16) << 16 | int(element, 16)
    else:
        tag = tag_for_keyword(name)
    if tag is None:
        raise ValueError(f"[dicom] patient_id_tag = {name}: no such DICOM attribute")
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise ValueError(f"[dicom] patient_id_tag = {name}: not in the DICOM dictionary") from None
    if vr not in ID_VRS:
        allowed = ", ".join(sorted(ID_VRS))
        raise ValueError(
            f"[dicom] patient_id_tag = {name}: its VR {vr} cannot hold an id (allowed: {allowed})"
        )
    return tag, keyword_for_tag(tag) or name


@dataclass(frozen=True)
class DicomFile:
    """A file read once: its bytes (`held`: what is hashed and stored, in an aligned buffer the caller
    releases once the bytes are checked, hashed and written), its parsed header (the pixel data is not
    read into it: its element points into the bytes) and the facts mapped from that header."""

    facts: DicomFacts
    dataset: Any
    held: uncached.Held

    @property
    def data(self) -> memoryview:
        return self.held.view


def read_file(
    path: str,
    display: str,
    id_tag: int,
    max_bytes: int,
    direct: bool = False,
    within: tuple[str, ...] = (),
) -> DicomFile:
    """The DICOM Part 10 file at `path`, read once (the caller releases `held`); DicomError with the
    reason when it is not importable. `direct`: a file the bridge wrote past the page cache (an upload),
    read the same way; `within`: the folders it must lie in once opened (fileset.open_inside)."""
    try:
        fd = open_inside(path, within)
        try:
            size = os.fstat(fd).st_size
            if size > max_bytes:
                limit = f"{max_bytes // 2**20} MB, [dicom] max_file_mb"
                raise DicomError(f"too large: {size / 2**20:.1f} MB (limit {limit})")
            held = uncached.read_held(fd, size, direct=direct)
        finally:
            os.close(fd)
    except OSError as exc:
        raise DicomError(f"cannot be read: {exc.strerror or exc}") from None
    except OutsideFolders as exc:
        raise DicomError(str(exc)) from None
    try:
        dataset, facts = parse(held.view, path, display, id_tag)
    except BaseException:
        held.release()
        raise
    return DicomFile(facts, dataset, held)


def parse(data: memoryview, path: str, display: str, id_tag: int) -> tuple[Any, DicomFacts]:
    """The header of a DICOM Part 10 file's bytes, checked for completeness and mapped onto the store:
    the dataset (its pixel data not read) and the facts."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise DicomError("not a DICOM file (no DICM marker after the 128-byte preamble)")
    with warnings.catch_warnings():
        # pydicom warns about non-conformant values and reads on; what matters is checked below.
        warnings.simplefilter("ignore")
        try:
            ds = header.read_plain(data, _DEFER_BYTES)  # uncompressed data; anything else: pydicom's reader
            if ds is None:
                ds = pydicom.dcmread(header.ViewReader(data), defer_size=_DEFER_BYTES)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise DicomError(f"truncated or corrupt DICOM header: {exc}") from None
        except Exception as exc:  # a parser meeting hostile bytes fails in many ways
            raise DicomError(f"corrupt DICOM header ({type(exc).__name__}: {exc})") from None
        try:
            check_complete(ds, len(data))
            if "PixelData" not in ds and _PIXEL_DATA_TAG in bytes(data):  # rare: a copy will do
                # pydicom drops an encapsulated Pixel Data element whose items run past the end of the file
                raise DicomError("truncated DICOM file: its pixel data ends early")
        except DicomError as exc:
            with contextlib.suppress(DicomError):  # a cut series UID: the file is reported on its own
                exc.series_uid = _ascii(ds, "SeriesInstanceUID")
            raise
        facts = facts_from_dataset(ds, path=path, display=display, size=len(data), id_tag=id_tag)
    return ds, facts


def check_complete(ds: Any, size: int) -> None:
    """DicomError when the file ends before what its elements declare: pydicom reads a truncated file
    without complaint, handing back a cut value (a half UID) or none at all."""
    meta = getattr(ds, "file_meta", None)
    group_length = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    if size < 132 + 12 or (isinstance(group_length, int) and 132 + 12 + group_length > size):
        raise DicomError("truncated DICOM file: it ends inside its meta information")
    # A deflated dataset is read from its inflated bytes: positions in it are not the file's (and the
    # transfer syntax is refused anyway).
    inflated = meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED
    for dataset in (meta, ds):
        if dataset is None:
            continue
        for element in dataset.values():  # as read: neither converted nor, when deferred, read
            if not getattr(element, "is_raw", False) or element.length == UNDEFINED_LENGTH:
                continue
            if element.value is None:  # deferred: not read, so check that the file holds it
                complete = inflated or element.value_tell + element.length <= size
            else:
                complete = len(element.value) == element.length
            if not complete:
                raise DicomError(f"truncated DICOM file: it ends inside {_tag_name(int(element.tag))}")


def facts_from_dataset(ds: Any, *, path: str, display: str, size: int, id_tag: int) -> DicomFacts:
    """Map a parsed dataset onto the store (see the module doc for what is accepted)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    sop_class = _ascii(ds, "SOPClassUID") or (str(meta.get("MediaStorageSOPClassUID", "")) if meta else "")
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        raise NotAnImage("a DICOMDIR, not an image: name it (or its folder) to import its file set")
    if not syntax:
        raise DicomError("corrupt DICOM file: its meta information names no transfer syntax")
    if syntax not in TRANSFER_SYNTAXES:
        raise DicomError(f"unsupported transfer syntax {_uid_name(syntax)}: {READ_SYNTAXES}")
    if sop_class not in SOP_CLASSES:
        raise DicomError(f"unsupported SOP class {_uid_name(sop_class)}: {READ_SOP_CLASSES}")
    if "PixelData" not in ds:
        raise DicomError("the DICOM file holds no pixel data")
    codec = _codec(ds)
    uids = {
        name: _single(ds, name, "latin_1")
        for name in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    }
    for name, value in uids.items():
        if not value:
            raise DicomError(f"the file has no {name}")
        if len(value) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value):
            raise DicomError(f"the file's {name} is not a valid UID: {value[:70]!r}")
    pms_id = _single(ds, id_tag, codec)
    if not pms_id:
        raise DicomError(f"no patient id in {_tag_name(id_tag)}, the attribute [dicom] patient_id_tag names")
    if len(pms_id) > MAX_ID_LENGTH:
        raise DicomError(f"the patient id in {_tag_name(id_tag)} is longer than {MAX_ID_LENGTH} characters")
    try:
        rows, columns = int(header.value(ds, "Rows")), int(header.value(ds, "Columns"))
        frames = int(_first(_text(ds, "NumberOfFrames", codec)) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomError(f"corrupt DICOM image description: {exc}") from None
    if rows < 1 or columns < 1 or frames < 1:
        raise DicomError(f"corrupt DICOM image description: {columns}x{rows} pixels, {frames} frames")
    modality = _first(_text(ds, "Modality", codec)).upper()
    manufacturer = " ".join(
        part
        for part in (_first(_text(ds, name, codec)) for name in ("Manufacturer", "ManufacturerModelName"))
        if part
    )
    teeth_found, unmapped = _teeth(ds, codec)
    attributes: dict[str, Any] = {
        "file": display,
        "patient_id_tag": _tag_name(id_tag),
        "character_set": _text(ds, "SpecificCharacterSet", codec),
        "image_type": _text(ds, "ImageType", codec),
    }
    for name in ("ImageLaterality", "PixelSpacing", "ImagerPixelSpacing", "InstitutionName"):
        values = _text(ds, name, codec)
        if values:
            attributes[name] = values
    if unmapped:
        attributes["unmapped_anatomy"] = unmapped
    series_number = _first(_text(ds, "SeriesNumber", codec))
    return DicomFacts(
        path=path,
        display=display,
        size=size,
        sop_class_uid=sop_class,
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax=syntax,
        modality=modality,
        pms_id=pms_id,
        demographics=_demographics(ds, codec),
        category=category_of(ds, sop_class, modality, codec),
        captured_at=capture_time(ds, codec),
        tooth_numbers=teeth_found,
        frames=frames,
        study_description=_first(_text(ds, "StudyDescription", codec))[:200],
        series_description=_first(_text(ds, "SeriesDescription", codec))[:200],
        series_number=int(series_number) if re.fullmatch(r"[+-]?\d{1,9}", series_number) else None,
        device=manufacturer[:200],
        attributes=attributes,
    )


# --------------------------------------------------------------------------------------------------
# Values


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _tag_name(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    keyword = keyword_for_tag(tag)
    return (
        f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if keyword
        else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    )


def _codec(ds: Any) -> str:
    """The codec of the dataset's Specific Character Set; DicomError for one this bridge does not read."""
    declared = [value.strip().upper() for value in _text(ds, "SpecificCharacterSet", "latin_1")] or [""]
    codecs = set()
    for value in declared:
        if value not in CHARACTER_SETS:
            raise DicomError(
                f"unsupported character set {value} (accepted: ISO_IR 6, ISO_IR 100, ISO_IR 192)"
            )
        codecs.add(CHARACTER_SETS[value])
    if len(codecs) > 1:
        combination = "\\".join(declared)
        raise DicomError(f"unsupported combination of character sets {combination}")
    return codecs.pop()


def _text(ds: Any, key: int | str, codec: str) -> list[str]:
    """The values of a string attribute, decoded strictly (DicomError when the bytes do not decode)."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(key) if isinstance(key, str) else key
    element = ds.get_item(tag) if tag is not None else None  # None when absent
    if element is None or element.value is None:
        return []
    raw = element.value
    if isinstance(raw, bytes):
        use = codec if element.VR in _TEXT_VRS or element.VR is None else "latin_1"
        try:
            text = raw.decode(use)
        except UnicodeDecodeError:
            charset = "\\".join(_text(ds, "SpecificCharacterSet", "latin_1")) or "the default repertoire"
            raise DicomError(
                f"{_tag_name(int(element.tag))} is not valid {charset} text, as the file's Specific Character"
                " Set declares (the sending device mislabels its character set)"
            ) from None
        values = text.split("\\")
    elif isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue":
        values = [str(v) for v in raw]
    else:
        values = [str(raw)]
    return [v.strip(" \x00") for v in values if v.strip(" \x00")]


def _ascii(ds: Any, keyword: str) -> str:
    return _first(_text(ds, keyword, "latin_1"))


def _single(ds: Any, key: int | str, codec: str) -> str:
    """The value of an attribute that identifies something (a patient id, a UID). An attribute the DICOM
    dictionary allows one value only (PatientID, the UIDs) that holds two is refused, not cut: "A\\B" in
    PatientID is a damaged or misconfigured file, and keeping "A" of it could file the image under another
    patient. Of a multi-valued attribute (OtherPatientIDs, VM 1-n) the first value is the id."""
    from pydicom.datadict import dictionary_VM, tag_for_keyword

    values = _text(ds, key, codec)
    tag = tag_for_keyword(key) if isinstance(key, str) else key
    if len(values) > 1 and tag is not None and dictionary_VM(tag) == "1":
        shown = ", ".join(repr(v[:40]) for v in values[:3])
        raise DicomError(f"{_tag_name(tag)} holds {len(values)} values ({shown}); it must hold one")
    return _first(values)


def _first(values: list[str]) -> str:
    return values[0] if values else ""


def _demographics(ds: Any, codec: str) -> Demographics:
    """Patient's Name (family^given^middle^prefix), birth date and sex, as the PMS request carries them."""
    name = _first(_text(ds, "PatientName", codec)).split("=")[0]
    parts = [*name.split("^"), "", "", "", ""]
    sex = _first(_text(ds, "PatientSex", codec)).upper()
    return Demographics(
        last_name=parts[0].strip()[:120],
        first_name=parts[1].strip()[:120],
        middle_name=parts[2].strip()[:120],
        title=parts[3].strip()[:40],
        birth_date=parse_date(_first(_text(ds, "PatientBirthDate", codec))),
        sex={"M": Sex.MALE, "F": Sex.FEMALE, "O": Sex.OTHER}.get(sex, Sex.UNKNOWN),
    )


def parse_date(text: str) -> date | None:
    """A DICOM DA value (YYYYMMDD, or the old YYYY.MM.DD); None when it is not a date."""
    digits = text.strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", digits):
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def parse_time(text: str) -> time | None:
    """A DICOM TM value (HH[MM[SS[.F]]], or the old HH:MM:SS); None when it is not a time."""
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text.strip().replace(":", ""))
    if not match:
        return None
    hour, minute, second, fraction = match.groups()
    try:
        return time(
            int(hour), int(minute or 0), min(int(second or 0), 59), int((fraction or "0").ljust(6, "0"))
        )
    except ValueError:
        return None


def parse_datetime(text: str) -> datetime | None:
    """A DICOM DT value as the practice's wall clock (a UTC offset, if any, is dropped); None if invalid."""
    match = re.fullmatch(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?", text.strip())
    if not match:
        return None
    day = parse_date(match.group(1))
    clock = parse_time(match.group(2)) if match.group(2) else time()
    return datetime.combine(day, clock) if day and clock is not None else None


def capture_time(ds: Any, codec: str) -> datetime | None:
    """When the image was taken: Acquisition DateTime, else Acquisition Date and Time, else Content
    Date and Time. Never the import time (ARCHITECTURE section 5)."""
    stamp = parse_datetime(_first(_text(ds, "AcquisitionDateTime", codec)))
    if stamp is not None:
        return stamp
    for date_key, time_key in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        day = parse_date(_first(_text(ds, date_key, codec)))
        if day is not None:
            clock = parse_time(_first(_text(ds, time_key, codec))) or time()
            return datetime.combine(day, clock)
    return None


def _teeth(ds: Any, codec: str) -> tuple[tuple[int, ...], list[dict[str, str]]]:
    """FDI numbers from the Primary Anatomic Structure codes, and the codes that are not teeth."""
    found: list[int] = []
    unmapped: list[dict[str, str]] = []
    for item in ds.get("PrimaryAnatomicStructureSequence", None) or ():
        value = _first(_text(item, "CodeValue", codec))
        scheme = _first(_text(item, "CodingSchemeDesignator", codec))
        number = teeth.fdi_for_code(scheme, value)
        if number is None:
            unmapped.append(
                {"scheme": scheme, "value": value, "meaning": _first(_text(item, "CodeMeaning", codec))}
            )
        elif number not in found:
            found.append(number)
    return tuple(found), unmapped


def category_of(ds: Any, sop_class: str, modality: str, codec: str) -> Category:
    """The store's category from the SOP class, then the modality, then words in the image's labels.

    IO objects are intra-oral X-rays and CT objects CBCT whatever else they say; DX and CR objects are
    panoramic (modality PX, or labelled so), cephalometric (labelled CEPH...) or other extra-oral X-rays;
    secondary captures go by modality (the imaging decoder's table), then colour (a photo), else a
    document.
    """
    if sop_class in (IO_PRESENTATION, IO_PROCESSING):
        return Category.INTRAORAL_XRAY
    if sop_class in (CT_IMAGE, ENHANCED_CT, LEGACY_CONVERTED_CT):
        return Category.CBCT
    if sop_class == VL_PHOTOGRAPHIC:
        return Category.PHOTO
    words = {
        word
        for name in ("ImageType", "SeriesDescription", "StudyDescription", "ProtocolName", "BodyPartExamined")
        for value in _text(ds, name, codec)
        for word in re.split(r"[^A-Z0-9]+", value.upper())
        if word
    }
    if sop_class in (DX_PRESENTATION, DX_PROCESSING, CR_IMAGE):
        if modality == "IO":
            return Category.INTRAORAL_XRAY
        if modality == "PX" or words & _PANORAMIC_WORDS:
            return Category.PANORAMIC
        if any("CEPH" in word for word in words):
            return Category.CEPHALOMETRIC
        return Category.EXTRAORAL_XRAY
    if modality in DICOM_CATEGORY:
        return DICOM_CATEGORY[modality]
    return Category.PHOTO if header.value(ds, "SamplesPerPixel", 1) == 3 else Category.DOCUMENT
