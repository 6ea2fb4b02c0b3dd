"""Images that were not DICOM, wrapped as DICOM objects for export (DTX Studio Clinic converts them too).

Which object an image becomes follows its category and what the store knows:

* intra-oral X-ray with a known pixel spacing and teeth: Digital Intra-Oral X-Ray For Presentation (IO),
  the teeth as Primary Anatomic Structure codes (CID 4018/4019), the jaw as Anatomic Region;
* intra-oral X-ray without teeth: Digital X-Ray For Presentation with modality IO (the intra-oral IOD
  requires a tooth or a quadrant code, and the store knows neither), laterality U;
* panoramic (modality PX) and cephalometric (DX) with a known pixel spacing: Digital X-Ray For Presentation;
* an X-ray whose pixel spacing is unknown: Secondary Capture (DX and IO require Imager Pixel Spacing, and an
  invented one would make every measurement on the exported image wrong); the export report says so;
* photos: VL Photographic Image; anything else (documents, other X-rays): Secondary Capture.

The pixel spacing comes from the image's stored attributes (`pixel_spacing_mm`), else from the file's own
resolution (PNG pHYs, TIFF resolution) when above 100 dpi: lower values are the 72/96 dpi placeholders of
graphics software, not a detector's pitch.

Pixels are the stored image decoded by the imaging decoder, unchanged, uncompressed. Patient Orientation
(required for DX and IO) follows the dental display convention (seen from the patient's front: rows toward
the patient's left, columns toward the feet; a lateral ceph faces right) carried back through the
clinician's stored mirroring and rotation, since the exported pixels are the unrotated original.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from bridge.dicom import read, teeth
from bridge.imaging.analyze import Decoded
from bridge.model import Category, ImageView

MIN_DETECTOR_DPI = 100.0

_MODALITY = {
    Category.INTRAORAL_XRAY: "IO",
    Category.PANORAMIC: "PX",
    Category.CEPHALOMETRIC: "DX",
    Category.EXTRAORAL_XRAY: "DX",
    Category.PHOTO: "XC",
    Category.DOCUMENT: "DOC",
    Category.CBCT: "CT",
}
_XRAYS = (Category.INTRAORAL_XRAY, Category.PANORAMIC, Category.CEPHALOMETRIC)
SKULL = ("89546000", "SCT", "Skull")
# Display direction -> patient direction in the dental display convention (x right, y down on screen).
_FACIAL = {"+x": "L", "-x": "R", "+y": "F", "-y": "H"}
_LATERAL = {"+x": "A", "-x": "P", "+y": "F", "-y": "H"}
# Where the stored image's right (u) and down (v) directions end up on screen after a clockwise rotation.
_ROTATED = {0: ("+x", "+y"), 90: ("+y", "-x"), 180: ("-x", "-y"), 270: ("-y", "+x")}
_OPPOSITE = {"+x": "-x", "-x": "+x", "+y": "-y", "-y": "+y"}


@dataclass(frozen=True)
class Wrapped:
    """A wrapped image: its dataset (without file meta) and, when the choice needs saying, why."""

    dataset: Any
    note: str = ""


def decoded_pixels(decoded: Decoded) -> np.ndarray[Any, Any]:
    """The decoded values as an array, (rows, columns) or (rows, columns, 3): the imaging decoder keeps
    8-bit images as Pillow images and deep grey ones as arrays (signed values shifted by `offset`)."""
    if decoded.pixels is not None:
        if decoded.offset:
            return decoded.pixels.astype(np.int32) - decoded.offset
        return decoded.pixels
    assert decoded.image is not None
    return np.asarray(decoded.image)


def patient_orientation(rotation: int, mirrored: bool, lateral: bool) -> list[str]:
    """Patient Orientation of the stored pixels, given that the clinician's mirroring (first) and rotation
    (clockwise, then) turn them into the dental display convention."""
    row, column = _ROTATED[rotation]
    if mirrored:  # the stored image's right is the left before rotating
        row = _OPPOSITE[row]
    directions = _LATERAL if lateral else _FACIAL
    return [directions[row], directions[column]]


def pixel_spacing(attributes: dict[str, Any], dpi: tuple[float, float] | None) -> tuple[float, float] | None:
    """(row, column) spacing in mm from the stored attributes, else a detector-like file resolution."""
    known = attributes.get("pixel_spacing_mm")
    if isinstance(known, (list, tuple)) and len(known) == 2 and all(float(v) > 0 for v in known):
        return float(known[0]), float(known[1])
    if dpi and all(value > MIN_DETECTOR_DPI for value in dpi):
        horizontal, vertical = dpi
        return round(25.4 / vertical, 6), round(25.4 / horizontal, 6)
    return None


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _date_time(moment: datetime) -> tuple[str, str]:
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def wrap(
    image: ImageView,
    attributes: dict[str, Any],
    pixels: np.ndarray[Any, Any],
    bits_stored: int,
    dpi: tuple[float, float] | None,
    created: datetime,
) -> Wrapped:
    """The DICOM dataset of a non-DICOM image: SOP class, pixels and the image-level attributes.

    Patient, study, series and equipment attributes are the exporter's (the same for every file of the
    set); `pixels` is what the imaging decoder made of the stored file, grey (rows, columns) or RGB.
    `created` dates the content when the capture time is unknown (the objects require a content date).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    colour = pixels.ndim == 3
    spacing = pixel_spacing(attributes, dpi)
    category = image.category
    ds = Dataset()
    note = ""
    if category in _XRAYS and not colour and spacing is not None:
        _xray(ds, image, spacing)
    elif category is Category.PHOTO:
        ds.SOPClassUID = read.VL_PHOTOGRAPHIC
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionContextSequence = Sequence([])
    else:
        ds.SOPClassUID = read.SECONDARY_CAPTURE
        ds.ConversionType = "WSD"
        if category in _XRAYS:
            note = (
                f"exported as Secondary Capture: the {category.value} has no known pixel spacing, which the"
                " DX and intra-oral objects require"
            )
    ds.Modality = _MODALITY[category]
    ds.SOPInstanceUID = image.sop_instance_uid
    ds.ContentDate, ds.ContentTime = _date_time(image.captured_at or created)
    if image.captured_at is not None and ds.SOPClassUID != read.SECONDARY_CAPTURE:
        ds.AcquisitionDateTime = image.captured_at.strftime("%Y%m%d%H%M%S")
    if "PatientOrientation" not in ds:
        ds.PatientOrientation = ""
    if "ImageLaterality" not in ds:  # General Series 2C: Laterality only where Image Laterality is not sent
        ds.Laterality = ""
    ds.BurnedInAnnotation = "NO"
    lossy = bool(attributes.get("lossy"))
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    if image.device:
        ds.ManufacturerModelName = image.device[:64]
    _pixels(ds, pixels, bits_stored, attributes)
    return Wrapped(ds, note)


def _xray(ds: Any, image: ImageView, spacing: tuple[float, float]) -> None:
    """The DX (or intra-oral) attributes of a grey X-ray of known pixel spacing."""
    from pydicom.sequence import Sequence

    category = image.category
    known_teeth = [n for n in image.tooth_numbers if teeth.is_fdi(n)]
    intraoral = category is Category.INTRAORAL_XRAY
    if intraoral and known_teeth:
        ds.SOPClassUID = read.IO_PRESENTATION
        ds.ImageLaterality = teeth.laterality(known_teeth)
        ds.AnatomicRegionSequence = Sequence([_code(*teeth.region(known_teeth))])
        ds.PrimaryAnatomicStructureSequence = Sequence([_code(*teeth.code_for_fdi(n)) for n in known_teeth])
        ds.PositionerType = "NONE"
    else:
        ds.SOPClassUID = read.DX_PRESENTATION
        region = SKULL if category is Category.CEPHALOMETRIC else teeth.JAW_REGION
        ds.AnatomicRegionSequence = Sequence([_code(*region)])
        ds.ImageLaterality = "B" if category is Category.PANORAMIC else "U"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.AcquisitionContextSequence = Sequence([])
    ds.DetectorType = ""
    ds.ImagerPixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    ds.PatientOrientation = patient_orientation(
        image.rotation, image.mirrored, lateral=category is Category.CEPHALOMETRIC
    )
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape = "IDENTITY"


def _pixels(ds: Any, pixels: np.ndarray[Any, Any], bits_stored: int, attributes: dict[str, Any]) -> None:
    """The Image Pixel module (native, little endian) and a display window for grey images."""
    colour = pixels.ndim == 3
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    wide = pixels.dtype != np.uint8
    ds.BitsAllocated = 16 if wide else 8
    top = int(pixels.max(initial=0))
    stored = max(min(bits_stored, ds.BitsAllocated), top.bit_length(), 1)  # never cut a value off
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = 0
    if not colour:
        window = attributes.get("window")
        if isinstance(window, dict) and {"center", "width"} <= set(window):
            ds.WindowCenter, ds.WindowWidth = f"{window['center']:.6g}", f"{window['width']:.6g}"
            if window.get("function") in ("LINEAR_EXACT", "SIGMOID"):
                ds.VOILUTFunction = window["function"]
        else:  # the whole range of the stored bits
            ds.WindowCenter, ds.WindowWidth = str(1 << (stored - 1)), str(1 << stored)
    dtype = "<u2" if wide else np.uint8
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OW" if wide else "OB"
