"""Decoding and describing image files: format, size, bit depth, colour. Runs in the process pool.

Everything is decided from the file itself, never from its name or a label a sender attached:
* the format from its first bytes (PNG, JPEG, TIFF, DICOM Part 10), so a renamed file is still known;
* colour from the pixels: an RGB file whose channels are all equal is a grey X-ray (`is_grey_rgb`);
* `bits_stored` from the container's own declaration (see `docs/imaging.md` for the rule);
* which way is up from the file's EXIF orientation (cameras and phones store the sensor's pixels and say
  how to turn them): the decoded pixels, and so the analysed width and height, are upright, and the
  clinician's rotation and mirroring apply to those at render time.

A file is decoded completely before anything is stored: a truncated or corrupt file fails here and the
sender gets the reason, while the store stays untouched.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageOps, TiffImagePlugin, UnidentifiedImageError

from bridge.dicom.header import value as dicom_value
from bridge.model import Category, NewImage

# Below Pillow's own decompression-bomb warning (about 89 M pixels), above any dental image (a 50 MP photo).
MAX_PIXELS = 80_000_000
# A lossy JPEG of a grey image can differ between channels by a rounding step; a real colour photo
# differs by far more. Lossless sources must be exactly equal.
LOSSY_GREY_TOLERANCE = 2
# Robust automatic window for 12/16-bit images without one of their own (percent of pixels clipped).
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
# Pixels sampled for the automatic window: a regular grid, enough for stable percentiles and cheap.
AUTO_WINDOW_SAMPLES = 100_000

Pixels = np.ndarray[Any, Any]


class ImagingError(ValueError):
    """The file cannot be ingested; the message names the reason for the sender (a 4xx answer)."""


@dataclass(frozen=True)
class Window:
    """A display window in modality units (DICOM VOI: centre, width, function)."""

    center: float
    width: float
    function: str = "LINEAR"  # LINEAR | LINEAR_EXACT | SIGMOID (DICOM VOI LUT Function)
    source: str = "dicom"  # dicom | auto

    def to_json(self) -> dict[str, Any]:
        return {
            "center": round(self.center, 3),
            "width": round(self.width, 3),
            "function": self.function,
            "source": self.source,
        }


@dataclass(frozen=True)
class Decoded:
    """Pixels ready for display mapping, with the facts that decide the mapping.

    Deep grey images (more than 8 bits) are a (rows, columns) uint16 array in `pixels` (signed sources
    shifted by `offset`); everything 8-bit stays a Pillow image in `image` (mode L or RGB), because
    copying a 12-megapixel photo into numpy costs more than rendering its thumbnail. A grey image stored
    as RGB arrives here as one channel.
    """

    color: bool
    bits_stored: int
    lossy: bool
    file_ext: str
    media_type: str
    pixels: Pixels | None = None
    image: Image.Image | None = None
    frames: int = 1
    window: Window | None = None  # the source's own window; None = automatic (deep images) or none
    slope: float = 1.0
    intercept: float = 0.0
    offset: int = 0  # added to signed stored values to index them as uint16
    value_bits: int = 16  # every value in `pixels` is below 2**value_bits (DICOM masks to BitsStored)
    invert: bool = False  # MONOCHROME1: high values are dark
    category: Category | None = None  # what the source says it is (DICOM modality), if it says
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def deep(self) -> bool:
        """True for grey images with more than 8 bits per pixel, which need a display window."""
        return self.pixels is not None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        if self.pixels is not None:
            return int(self.pixels.shape[1]), int(self.pixels.shape[0])
        assert self.image is not None
        return self.image.size

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


@dataclass(frozen=True)
class Analysis:
    """Facts about a file, decided from its pixels rather than its name or label."""

    file_ext: str
    media_type: str
    width: int
    height: int
    bits_stored: int
    color: bool
    category: Category
    frames: int = 1
    attributes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Format sniffing


_UNSUPPORTED_MAGIC = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 (JP2)"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"%PDF", "PDF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"PK\x03\x04", "ZIP archive"),
)
ACCEPTED = "PNG, TIFF, JPEG or DICOM"


def sniff(data: bytes) -> str:
    """The format of `data` from its first bytes: png, jpeg, tiff or dicom; anything else is refused."""
    if not data:
        raise ImagingError("the file is empty")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[128:132] == b"DICM":  # before TIFF: a DICOM preamble may make the file a TIFF too (PS3.10 7.5)
        return "dicom"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    for magic, name in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            raise ImagingError(f"unsupported image format {name} (accepted: {ACCEPTED})")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1") or data[8:12] == b"WEBP":
        raise ImagingError(f"unsupported image format HEIF/WebP (accepted: {ACCEPTED})")
    raise ImagingError(f"not an image file this bridge reads (accepted: {ACCEPTED})")


# --------------------------------------------------------------------------------------------------
# Colour


def is_grey_rgb(img: Image.Image, tolerance: int = 0) -> bool:
    """True when every pixel of an RGB image has R, G and B within `tolerance` of each other.

    A sparse sample is checked first: a colour photo shows its colour there at once, so only grey images
    (where the answer is "yes") pay for the full comparison. Both run in Pillow's C code.
    """
    step = max(1, int((img.width * img.height / 65_536) ** 0.5))
    sample = img.resize((max(1, img.width // step), max(1, img.height // step)), Image.Resampling.NEAREST)
    for view in (sample, img):
        red, green, blue = view.split()[:3]
        for one, other in ((red, green), (green, blue)):
            if ImageChops.difference(one, other).getextrema()[1] > tolerance:  # type: ignore[operator]
                return False
    return True


def _grey_or_colour(rgb: Image.Image, *, lossy: bool) -> tuple[Image.Image, bool]:
    """(image, color): one channel (L) when the RGB pixels are grey, else RGB."""
    rgb = rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    if is_grey_rgb(rgb, LOSSY_GREY_TOLERANCE if lossy else 0):
        return rgb.getchannel("G"), False
    return rgb, True


# --------------------------------------------------------------------------------------------------
# PNG, TIFF, JPEG (Pillow)


_PIL_FORMATS = {"png": ("PNG", "png", "image/png"), "jpeg": ("JPEG", "jpg", "image/jpeg")}
_PIL_FORMATS["tiff"] = ("TIFF", "tif", "image/tiff")


def png_bit_facts(data: bytes) -> tuple[int, int | None]:
    """(bit depth from IHDR, significant bits from sBIT or None), read from the chunk headers.

    Pillow reduces 16-bit colour PNGs to 8 bits and does not report sBIT, so both are read here.
    """
    depth = data[24] if len(data) > 24 else 8
    color_type = data[25] if len(data) > 25 else 0
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"sBIT" and color_type != 3:  # palette sBIT describes the palette, not the pixels
            values = data[pos + 8 : pos + 8 + length]
            colour_values = values[:3] if color_type in (2, 6) else values[:1]
            if colour_values and 0 < max(colour_values) <= depth:
                return depth, max(colour_values)
            return depth, None
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return depth, None


def _pil_bits(fmt: str, img: Image.Image, data: bytes) -> tuple[int, dict[str, Any]]:
    """bits_stored and source facts for a Pillow-decoded file (rule: docs/imaging.md)."""
    if fmt == "png":
        depth, sbit = png_bit_facts(data)
        if img.mode == "1":
            depth = 1
        return (sbit or depth), {"container_bits": depth, **({"sbit": sbit} if sbit else {})}
    if fmt == "tiff":
        tags = getattr(img, "tag_v2", {})
        # TIFF 6.0: a file without BitsPerSample has 1 bit per sample (Pillow writes a bilevel image so)
        per_sample = tags.get(TiffImagePlugin.BITSPERSAMPLE, 1)
        depth = int(per_sample[0] if isinstance(per_sample, tuple) else per_sample)
        return depth, {"container_bits": depth}
    return 8, {"container_bits": 8}


def _decode_pillow(data: bytes, fmt: str, draft: int | None = None) -> Decoded:
    pil_format, ext, media_type = _PIL_FORMATS[fmt]
    try:
        with warnings.catch_warnings():
            # Pillow warns about damaged metadata (a camera's odd EXIF) and decodes on; damaged pixels
            # raise. Only the latter refuse a file.
            warnings.simplefilter("ignore")
            return _decode_pillow_checked(data, fmt, pil_format, ext, media_type, draft)
    except ImagingError:
        raise
    except Image.DecompressionBombError:
        raise ImagingError(f"image too large (limit {MAX_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise ImagingError(f"corrupt {pil_format} file: its header cannot be read") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise ImagingError(f"corrupt or truncated {pil_format} file: {exc}") from None


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation (1-8) of a Pillow image, 1 when it has none or an unreadable one: a camera's
    damaged EXIF must not refuse its photo (the pixels decide that)."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow's EXIF parser raises many kinds on damaged data; all mean "unknown"
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(img: Image.Image) -> Image.Image:
    """The loaded `img` turned as its EXIF orientation says (exact transposes). Pillow 13 turns a TIFF
    itself while loading it and drops the tag; older versions leave that to this, as for every format."""
    if exif_orientation(img) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _decode_pillow_checked(
    data: bytes, fmt: str, pil_format: str, ext: str, media_type: str, draft: int | None
) -> Decoded:
    """Decode with Pillow, restricted to the sniffed format (no other plugin parses untrusted bytes)."""
    img = Image.open(io.BytesIO(data), formats=[pil_format])
    if img.width * img.height > MAX_PIXELS:
        raise ImagingError(f"image too large: {img.width}x{img.height} pixels (limit {MAX_PIXELS})")
    frames = int(getattr(img, "n_frames", 1))
    orientation = exif_orientation(img)  # before loading, which may turn the image and drop the tag
    if draft is not None and fmt == "jpeg":
        img.draft(img.mode, (draft, draft))  # libjpeg scales while decoding (1/2 .. 1/8): far faster
    img.load()
    bits, facts = _pil_bits(fmt, img, data)  # from the file's own image: a turned copy has no TIFF tags
    upright = _upright(img)
    # Transparency (a PNG's tRNS, a GIF-style palette index) is alpha, which is ignored (see
    # docs/imaging.md, Colour). Kept in `info`, it outlives conversions in the wrong form: an RGB triple
    # on the grey channel of a grey RGB image, which the renderer's encoder then refuses.
    upright.info.pop("transparency", None)
    mode = upright.mode
    if fmt == "png":
        # Pillow stops at the last image data; verify() reads on to IEND and checks every CRC, so a
        # file cut after its pixels (or with a damaged chunk) is still refused.
        with Image.open(io.BytesIO(data), formats=[pil_format]) as check:
            check.verify()
    lossy = fmt == "jpeg"
    facts["source_format"] = pil_format.lower()
    facts["mode"] = mode
    if orientation != 1:
        facts["exif_orientation"] = orientation  # the file's pixels are stored turned: say so
    common: dict[str, Any] = {
        "bits_stored": bits,
        "lossy": lossy,
        "file_ext": ext,
        "media_type": media_type,
        "frames": frames,
        "attributes": facts,
    }
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        image, color = _grey_or_colour(upright, lossy=lossy)
        return Decoded(color=color, image=image, **common)
    if mode in ("L", "1", "LA", "La"):
        return Decoded(color=False, image=upright if mode == "L" else upright.convert("L"), **common)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return Decoded(color=False, pixels=np.asarray(upright).astype(np.uint16, copy=False), **common)
    if mode == "I":
        pixels = np.asarray(upright)
        if pixels.size and (int(pixels.min()) < 0 or int(pixels.max()) > 65535):
            raise ImagingError("unsupported pixels: 32-bit integer values beyond the 16-bit range")
        return Decoded(color=False, pixels=pixels.astype(np.uint16), **common)
    raise ImagingError(f"unsupported pixel format {mode} in {pil_format} file")


# --------------------------------------------------------------------------------------------------
# DICOM (pydicom; compressed pixel data through the pylibjpeg plugins)


# DICOM modality -> category (DICOM import uses it too, for objects whose SOP class does not decide).
DICOM_CATEGORY = {
    "IO": Category.INTRAORAL_XRAY,
    "PX": Category.PANORAMIC,
    "DX": Category.EXTRAORAL_XRAY,
    "CR": Category.EXTRAORAL_XRAY,
    "CT": Category.CBCT,
    "XC": Category.PHOTO,
    "VL": Category.PHOTO,
    "DOC": Category.DOCUMENT,
}
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def _first_number(value: Any) -> float | None:
    """The first value of a possibly multi-valued DICOM number (WindowCenter can hold several)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _dicom_lossy(ds: Any) -> bool:
    from pydicom.uid import (
        JPEG2000,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLSNearLossless,
    )

    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    lossy_syntaxes = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless}
    return syntax in lossy_syntaxes or str(dicom_value(ds, "LossyImageCompression", "")) == "01"


def _native_grey16(
    ds: Any, rows: int, columns: int, frames: int, bits_allocated: int, bits_stored: int
) -> Pixels | None:
    """The common X-ray case read straight from the buffer, or None for pydicom's general decoder.

    Uncompressed little-endian, one frame, one unsigned 16-bit sample: the pixels are the bytes, and
    masking the unused high bits (as pydicom does) is one pass instead of pydicom's two plus a copy.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    native = ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    simple = (
        frames == 1
        and int(dicom_value(ds, "SamplesPerPixel", 1)) == 1
        and int(dicom_value(ds, "PixelRepresentation", 0)) == 0
    )
    if not (native and simple and bits_allocated == 16 and 0 < bits_stored <= 16):
        return None
    buffer = ds.PixelData
    if len(buffer) < rows * columns * 2:
        raise ImagingError(
            f"corrupt or truncated DICOM pixel data: {len(buffer)} bytes for {columns}x{rows} 16-bit pixels"
        )
    arr = np.frombuffer(buffer, "<u2", rows * columns).reshape(rows, columns)
    return arr & np.uint16((1 << bits_stored) - 1) if bits_stored < 16 else arr


@dataclass(frozen=True)
class _DicomImage:
    """What a DICOM header says about its image, checked; `attributes` are those stored with it."""

    syntax: Any  # pydicom UID
    photometric: str
    rows: int
    columns: int
    frames: int
    bits_allocated: int
    bits_stored: int
    lossy: bool
    modality: str
    attributes: dict[str, Any]


def _dicom_image(ds: Any) -> _DicomImage:
    """The image description of a parsed DICOM dataset; ImagingError when it cannot describe an image."""
    if "PixelData" not in ds:
        raise ImagingError("the DICOM file holds no pixel data (not an image object)")
    if "TransferSyntaxUID" not in ds.file_meta:
        raise ImagingError("corrupt DICOM file: its meta information names no transfer syntax")
    photometric = str(dicom_value(ds, "PhotometricInterpretation", ""))
    if photometric not in _GREY + _COLOUR:
        raise ImagingError(f"unsupported DICOM photometric interpretation {photometric or 'missing'}")
    try:
        rows, columns = int(dicom_value(ds, "Rows")), int(dicom_value(ds, "Columns"))
        frames = int(dicom_value(ds, "NumberOfFrames", 1) or 1)
        bits_allocated = int(dicom_value(ds, "BitsAllocated"))
        bits_stored = int(dicom_value(ds, "BitsStored", bits_allocated))
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImagingError(f"corrupt DICOM image description: {exc}") from None
    if rows * columns > MAX_PIXELS:
        raise ImagingError(f"image too large: {columns}x{rows} pixels (limit {MAX_PIXELS})")
    syntax = ds.file_meta.TransferSyntaxUID
    lossy = _dicom_lossy(ds)
    modality = str(dicom_value(ds, "Modality", ""))
    attributes: dict[str, Any] = {
        "source_format": "dicom",
        "transfer_syntax": str(syntax),
        "photometric": photometric,
        "bits_allocated": bits_allocated,
        "lossy": lossy,
        "dicom": {
            "modality": modality,
            "sop_class_uid": str(dicom_value(ds, "SOPClassUID", "")),
            "sop_instance_uid": str(dicom_value(ds, "SOPInstanceUID", "")),
            "study_uid": str(dicom_value(ds, "StudyInstanceUID", "")),
            "series_uid": str(dicom_value(ds, "SeriesInstanceUID", "")),
        },
    }
    return _DicomImage(
        syntax, photometric, rows, columns, frames, bits_allocated, bits_stored, lossy, modality, attributes
    )


def _grey_display(ds: Any, attributes: dict[str, Any]) -> tuple[Window | None, float, float]:
    """(window, slope, intercept) of a grey DICOM image; the window and rescale go into `attributes`."""
    slope = _first_number(dicom_value(ds, "RescaleSlope", None)) or 1.0
    intercept = _first_number(dicom_value(ds, "RescaleIntercept", None)) or 0.0
    center = _first_number(dicom_value(ds, "WindowCenter", None))
    width = _first_number(dicom_value(ds, "WindowWidth", None))
    window = None
    if center is not None and width is not None and width >= 1:
        function = str(dicom_value(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        window = Window(center, width, function if function in ("LINEAR_EXACT", "SIGMOID") else "LINEAR")
        attributes["window"] = window.to_json()
    if slope != 1.0 or intercept != 0.0:
        attributes["rescale"] = {"slope": slope, "intercept": intercept}
    return window, slope, intercept


def _decode_dicom(data: bytes) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels.processing import apply_color_lut
    from pydicom.pixels.utils import pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error) as exc:
        raise ImagingError(f"corrupt or truncated DICOM file: {exc}") from None
    image = _dicom_image(ds)
    rows, columns, frames, syntax = image.rows, image.columns, image.frames, image.syntax
    bits_stored, photometric, attributes = image.bits_stored, image.photometric, image.attributes
    try:
        arr = _native_grey16(ds, rows, columns, frames, image.bits_allocated, bits_stored)
        if arr is None:
            # Only the first frame is shown; the length check of native data covers every frame.
            arr = pixel_array(ds, index=0 if frames > 1 else None)
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
    except NotImplementedError as exc:
        raise ImagingError(f"unsupported DICOM pixel data ({syntax.name}): {exc}") from None
    except (ValueError, RuntimeError, OSError, EOFError, KeyError, AttributeError, TypeError) as exc:
        raise ImagingError(f"corrupt or truncated DICOM pixel data ({syntax.name}): {exc}") from None
    common: dict[str, Any] = {
        "lossy": image.lossy,
        "file_ext": "dcm",
        "media_type": "application/dicom",
        "frames": frames,
        "category": DICOM_CATEGORY.get(image.modality),
        "attributes": attributes,
    }
    if arr.ndim == 3:  # colour (pydicom has already converted YBR to RGB)
        if arr.dtype != np.uint8:
            depth = bits_stored if photometric != "PALETTE COLOR" else 16
            arr = (arr >> max(depth - 8, 0)).astype(np.uint8)
        colour_image, color = _grey_or_colour(
            Image.fromarray(np.ascontiguousarray(arr[..., :3])), lossy=image.lossy
        )
        return Decoded(image=colour_image, color=color, bits_stored=bits_stored, **common)
    window, slope, intercept = _grey_display(ds, attributes)
    offset = 0
    if arr.dtype.kind == "i":  # signed: shift into uint16 so a 64K lookup table can index it
        offset = 32768 if arr.dtype.itemsize == 2 else 128
        arr = (arr.astype(np.int32) + offset).astype(np.uint16 if offset == 32768 else np.uint8)
    elif arr.dtype not in (np.uint8, np.uint16):
        arr = arr.astype(np.uint16)
    deep = arr.dtype == np.uint16
    return Decoded(
        pixels=arr if deep else None,
        image=None if deep else Image.fromarray(np.ascontiguousarray(arr)),
        color=False,
        bits_stored=bits_stored,
        window=window,
        slope=slope,
        intercept=intercept,
        offset=offset,
        invert=photometric == "MONOCHROME1",
        value_bits=bits_stored if offset == 0 and 8 <= bits_stored <= 16 else 16,
        **common,
    )


@dataclass(frozen=True)
class NativeGrey:
    """An uncompressed grey DICOM image as its header describes it (`native_grey`): its description and
    the bytes of pixel data it declares (every frame, before the padding of an odd length)."""

    image: _DicomImage
    length: int


def native_grey(ds: Any) -> NativeGrey | None:
    """The header of an uncompressed grey DICOM image; None for any other image, which only a decode
    checks. Described once here for both the length check and `analyze_native_grey`."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if ds.file_meta.get("TransferSyntaxUID") not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    try:
        image = _dicom_image(ds)
        grey = image.photometric in _GREY and int(dicom_value(ds, "SamplesPerPixel", 1)) == 1
    except (ImagingError, TypeError, ValueError):
        return None  # the decode says what is wrong
    if not grey or image.bits_allocated not in (8, 16) or not 0 < image.bits_stored <= image.bits_allocated:
        return None
    return NativeGrey(image, image.rows * image.columns * image.frames * image.bits_allocated // 8)


def analyze_native_grey(ds: Any, native: NativeGrey, pixel_data: memoryview) -> Analysis | None:
    """What `analyze_dicom` says of an uncompressed grey DICOM image (`native_grey` described it), from its
    parsed header and the raw bytes of its pixel data, without decoding them: for native data the
    decode checks the length, which the caller has done, then only re-arranges bytes the description
    does not need. A 16-bit image without a window of its own gets its automatic window from a sample
    of its (masked) pixels; None when they are signed, which only the decode shifts.
    """
    image = native.image
    attributes = image.attributes
    window, slope, intercept = _grey_display(ds, attributes)
    if image.bits_allocated == 16 and window is None:
        if int(dicom_value(ds, "PixelRepresentation", 0)) == 1:
            return None
        rows, columns = image.rows, image.columns
        sample = _grid_sample(np.frombuffer(pixel_data, "<u2", rows * columns).reshape(rows, columns))
        if image.bits_stored < 16:  # only the sample is masked (the whole image was 0.2 ms of 3 MB);
            sample = sample & np.uint16((1 << image.bits_stored) - 1)  # not in place: it may be the file
        attributes["window"] = _window_of(sample, 0, slope, intercept).to_json()
    return Analysis(
        file_ext="dcm",
        media_type="application/dicom",
        width=image.columns,
        height=image.rows,
        bits_stored=image.bits_stored,
        color=False,
        category=_category(DICOM_CATEGORY.get(image.modality), False, image.columns, image.rows),
        frames=image.frames,
        attributes=attributes,
    )


# --------------------------------------------------------------------------------------------------
# Entry points


def decode(data: bytes, *, draft: int | None = None) -> Decoded:
    """Decode `data` completely (any damage fails here, before anything is stored).

    `draft` is for rendering a stored file only: a JPEG may then be decoded at a reduced scale whose
    long edge is still at least `draft` pixels.
    """
    fmt = sniff(data)
    if fmt == "dicom":
        return _decode_dicom(data)
    return _decode_pillow(data, fmt, draft)


def auto_window(decoded: Decoded) -> Window:
    """A robust window for deep grey images: the 0.5 and 99.5 percentiles of a regular grid sample.

    Percentiles come from a histogram (np.bincount) of at most AUTO_WINDOW_SAMPLES pixels, so the
    answer is deterministic (the same file always gets the same window) and costs about a millisecond.
    """
    assert decoded.pixels is not None, "only deep images get an automatic window"
    return _window_of(_grid_sample(decoded.pixels), decoded.offset, decoded.slope, decoded.intercept)


def _grid_sample(pixels: Pixels) -> Pixels:
    """A regular grid of at most about AUTO_WINDOW_SAMPLES of `pixels`, flat (a view of them when the
    grid takes every pixel)."""
    step = max(1, round((pixels.shape[0] * pixels.shape[1] / AUTO_WINDOW_SAMPLES) ** 0.5))
    return pixels[::step, ::step].ravel()


def _window_of(sample: Pixels, offset: int, slope: float, intercept: float) -> Window:
    """`auto_window`'s window from a sample of stored values (signed ones shifted by `offset`)."""
    counts = np.cumsum(np.bincount(sample, minlength=256))
    low_q, high_q = AUTO_WINDOW_PERCENTILES
    low = int(np.searchsorted(counts, counts[-1] * low_q / 100.0))
    high = int(np.searchsorted(counts, counts[-1] * high_q / 100.0))
    low_v = (low - offset) * slope + intercept
    high_v = (high - offset) * slope + intercept
    low_v, high_v = min(low_v, high_v), max(low_v, high_v)
    width = max(high_v - low_v, 1.0)
    return Window(center=low_v + width / 2, width=width, function="LINEAR_EXACT", source="auto")


def guess_category(decoded: Decoded) -> Category:
    """The category the source declares (DICOM modality), else a guess from the pixels.

    Colour is a photo; a wide grey image (aspect 1.8 or more, 1500 pixels or wider) is a panoramic;
    any other grey image an intra-oral X-ray. Senders that know better pass the category explicitly.
    """
    return _category(decoded.category, decoded.color, decoded.width, decoded.height)


def _category(declared: Category | None, color: bool, width: int, height: int) -> Category:
    if declared is not None and (declared is not Category.PHOTO or color):
        return declared
    if color:
        return Category.PHOTO
    if width >= 1500 and width >= 1.8 * height:
        return Category.PANORAMIC
    return Category.INTRAORAL_XRAY


def describe(decoded: Decoded) -> Analysis:
    """The facts stored with the image; deep grey images record their display window."""
    attributes = dict(decoded.attributes)
    attributes["lossy"] = decoded.lossy
    if decoded.deep and decoded.window is None:
        attributes["window"] = auto_window(decoded).to_json()
    return Analysis(
        file_ext=decoded.file_ext,
        media_type=decoded.media_type,
        width=decoded.width,
        height=decoded.height,
        bits_stored=decoded.bits_stored,
        color=decoded.color,
        category=guess_category(decoded),
        frames=decoded.frames,
        attributes=attributes,
    )


def analyze_dicom(data: bytes) -> Analysis:
    """Decode a DICOM Part 10 file fully and describe it as DICOM, even when its preamble is also a TIFF
    header (a dual-personality file, which `decode` sniffs as TIFF): what the DICOM import reads."""
    return describe(_decode_dicom(data))


def new_image(facts: Analysis, sha256: str, size: int, metadata: dict[str, object]) -> NewImage:
    """The image to add for a stored file: the facts decided from its pixels, then what the sender says
    (`metadata`: NewImage fields; `attributes` are merged over the decoded ones)."""
    fields: dict[str, object] = {"category": facts.category, "frames": facts.frames}
    fields.update({k: v for k, v in metadata.items() if v is not None})
    extra = metadata.get("attributes")
    fields["attributes"] = {**facts.attributes, **(extra if isinstance(extra, dict) else {})}
    return NewImage(
        sha256=sha256,
        file_ext=facts.file_ext,
        media_type=facts.media_type,
        size_bytes=size,
        width=facts.width,
        height=facts.height,
        bits_stored=facts.bits_stored,
        color=facts.color,
        **fields,  # type: ignore[arg-type]
    )
