"""Imaging without the store: decoding, colour and bit depth, display mapping, orientation, watermark."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import ExifTags, Image

from bridge.imaging.analyze import Analysis, ImagingError, decode
from bridge.imaging.render import (
    RenderRequest,
    Watermark,
    analyze_and_render,
    render_decoded,
    watermark_box,
    window_lut,
)
from bridge.model import Category
from tests.support import synthetic

MARK = Watermark("NOT FOR DIAGNOSIS")
RNG = np.random.default_rng(7)


def analyze(data: bytes) -> Analysis:
    """The facts an upload stores for `data`: `analyze_and_render`, the pipeline's entry, without renders."""
    facts, renders = analyze_and_render(data, [])
    assert renders == []
    return facts


def pixels_of(data: bytes) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)


def render(data: bytes, **kwargs: Any) -> bytes:
    """One rendering of a file, PNG by default so that pixel comparisons are exact."""
    options: dict[str, Any] = {"size": None, "fmt": "PNG", **kwargs}
    (out,) = render_decoded(decode(data), [RenderRequest(**options)])
    return out


# ------------------------------------------------------------------------------------------------
# Colour and bit depth, decided from the file


@pytest.mark.parametrize("writer", [synthetic.png_bytes, synthetic.tiff_bytes])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rgb_with_equal_channels_is_grey_and_a_colour_photo_is_colour(writer: Any, dtype: Any) -> None:
    top = np.iinfo(dtype).max
    grey = RNG.integers(0, top, (40, 50, 1), dtype=dtype)
    grey_rgb = np.repeat(grey, 3, axis=2)
    colour = grey_rgb.copy()
    colour[10, 20, 0] = colour[10, 20, 1] ^ (top // 2 + 1)  # one pixel with colour is enough
    rgba = np.concatenate([grey_rgb, np.full((40, 50, 1), top, dtype)], axis=2)

    assert analyze(writer(grey_rgb)).color is False
    assert analyze(writer(rgba)).color is False
    assert analyze(writer(colour)).color is True
    assert analyze(writer(grey_rgb)).category is Category.INTRAORAL_XRAY
    assert analyze(writer(colour)).category is Category.PHOTO


def test_jpeg_photo_is_colour_and_a_grey_jpeg_in_rgb_is_grey() -> None:
    photo = synthetic.photo(400, 300)
    out = io.BytesIO()
    Image.fromarray(photo).save(out, "JPEG", quality=90)
    facts = analyze(out.getvalue())
    assert (facts.color, facts.category, facts.bits_stored, facts.file_ext) == (
        True,
        Category.PHOTO,
        8,
        "jpg",
    )

    grey = np.repeat(photo[..., :1], 3, axis=2)
    out = io.BytesIO()
    Image.fromarray(grey).save(out, "JPEG", quality=90)
    assert analyze(out.getvalue()).color is False


def test_bits_stored_follows_dicom_bits_stored_then_png_sbit_then_the_container() -> None:
    deep = synthetic.intraoral(130, 100, bits=12)
    assert analyze(synthetic.dicom_bytes(deep, bits_stored=12)).bits_stored == 12
    assert analyze(synthetic.png_bytes(deep, sbit=12)).bits_stored == 12
    assert analyze(synthetic.png_bytes(deep)).bits_stored == 16
    assert analyze(synthetic.tiff_bytes(deep)).bits_stored == 16
    assert analyze(synthetic.png_bytes((deep >> 4).astype(np.uint8))).bits_stored == 8
    colour16 = RNG.integers(0, 65535, (20, 30, 3), dtype=np.uint16)
    facts = analyze(synthetic.png_bytes(colour16))
    assert (facts.color, facts.bits_stored) == (True, 16)


def test_a_bilevel_tiff_without_bits_per_sample_has_one_bit_stored() -> None:
    # TIFF 6.0's default for a missing BitsPerSample is 1, and Pillow writes an uncompressed bilevel
    # image without the tag; it was reported as 8 bits. With the tag (Group 4) it was right already.
    page = Image.fromarray(RNG.integers(0, 2, (32, 64), dtype=np.uint8) * 255).convert("1")
    for compression in ("raw", "group4"):
        out = io.BytesIO()
        page.save(out, "TIFF", compression=compression)
        assert analyze(out.getvalue()).bits_stored == 1, compression


def test_dicom_jpeg_baseline_colour_and_modality_category() -> None:
    facts = analyze(synthetic.dicom_bytes(synthetic.photo(64, 48), jpeg_baseline=True, modality="XC"))
    assert (facts.color, facts.category, facts.file_ext) == (True, Category.PHOTO, "dcm")
    assert facts.attributes["lossy"] is True
    pano = analyze(synthetic.dicom_bytes(synthetic.panoramic(300, 150), bits_stored=12, modality="PX"))
    assert (pano.color, pano.category, pano.bits_stored) == (False, Category.PANORAMIC, 12)


def test_a_wide_grey_image_without_a_label_is_taken_for_a_panoramic() -> None:
    assert analyze(synthetic.png_bytes(synthetic.panoramic(1600, 800))).category is Category.PANORAMIC


# ------------------------------------------------------------------------------------------------
# Display mapping


def test_dicom_window_is_recorded_and_applied_through_the_lookup_table() -> None:
    values = np.array([[0, 1000, 1500, 2000], [2500, 3000, 3500, 4095]], np.uint16)
    data = synthetic.dicom_bytes(values, bits_stored=12, window=(2000, 1000))
    facts = analyze(data)
    assert facts.attributes["window"] == {
        "center": 2000.0,
        "width": 1000.0,
        "function": "LINEAR",
        "source": "dicom",
    }
    shown = pixels_of(render(data))
    # PS3.3 C.11.2.1.2.1: below c - 0.5 - (w-1)/2 black, above c - 0.5 + (w-1)/2 white, linear between.
    expected = np.clip(((values - 1999.5) / 999.0 + 0.5), 0, 1) * 255
    assert np.array_equal(shown, np.rint(expected).astype(np.uint8))
    assert shown[0, 0] == 0 and shown[1, 3] == 255 and shown[0, 3] == 128


def test_rescale_slope_and_intercept_come_before_the_window() -> None:
    values = np.array([[0, 100, 200, 300]], np.uint16)
    data = synthetic.dicom_bytes(values, bits_stored=12, window=(0, 400), rescale=(2.0, -200.0))
    shown = pixels_of(render(data))  # modality values -200, 0, 200, 400
    assert shown[0, 0] == 0 and shown[0, 3] == 255 and shown[0, 1] in (127, 128)


def test_signed_8_bit_grey_without_a_window_shows_its_whole_range() -> None:
    """Signed 8-bit pixels (-128 .. 127) without a window render like the same ramp unsigned (0 .. 255):
    half of them were black, the default window ignoring that signed values are stored shifted."""
    import pydicom

    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    unsigned = synthetic.dicom_bytes(ramp)
    ds = pydicom.dcmread(io.BytesIO(unsigned))
    ds.PixelRepresentation = 1
    ds.PixelData = (ramp.astype(np.int16) - 128).astype(np.int8).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    shown_signed, shown_unsigned = pixels_of(render(out.getvalue())), pixels_of(render(unsigned))
    assert np.abs(shown_signed.astype(int) - shown_unsigned.astype(int)).max() <= 1
    assert shown_signed[0, 0] <= 1 and shown_signed[0, 255] >= 254


def test_a_dicom_file_whose_preamble_is_a_tiff_header_is_read_as_dicom() -> None:
    """PS3.10 lets the 128-byte preamble make a DICOM file a TIFF too: pydicom's CT_small.dcm starts
    with II*\\0. The DICM marker decides (it was refused as a corrupt TIFF)."""
    from tests.support.dicomfiles import sample

    data = sample("CT_small.dcm").read_bytes()
    assert data.startswith(b"II*\x00")
    facts = analyze(data)
    assert (facts.file_ext, facts.width, facts.height) == ("dcm", 128, 128)


def test_monochrome1_is_inverted() -> None:
    values = synthetic.intraoral(64, 48, bits=12)
    normal = pixels_of(render(synthetic.dicom_bytes(values, bits_stored=12, window=(2048, 4096))))
    inverted = pixels_of(
        render(synthetic.dicom_bytes(values, bits_stored=12, window=(2048, 4096), photometric="MONOCHROME1"))
    )
    assert np.array_equal(inverted.astype(np.int32), 255 - normal.astype(np.int32))


def test_deep_image_without_window_gets_a_robust_percentile_window() -> None:
    values = synthetic.intraoral(200, 150, bits=12)
    values[0, 0] = 65535  # one hot pixel must not squash the whole image into black
    data = synthetic.png_bytes(values)
    window = analyze(data).attributes["window"]
    assert window["source"] == "auto"
    assert window["center"] - window["width"] / 2 > 0 and window["center"] + window["width"] / 2 < 4096
    shown = pixels_of(render(data))
    assert shown.min() == 0 and shown.max() == 255
    assert np.percentile(shown, 50) > 20


def test_window_lut_covers_every_stored_value() -> None:
    from bridge.imaging.analyze import Window

    lut = window_lut(65536, Window(2048, 4096), 1.0, 0.0, 0, False)
    assert lut.shape == (65536,) and lut.dtype == np.uint8
    assert lut[0] == 0 and lut[4095] == 255 and np.all(np.diff(lut.astype(np.int32)) >= 0)


# ------------------------------------------------------------------------------------------------
# Orientation: mirror left-right first, then rotate clockwise


ORIENTATIONS = [(rotation, mirrored) for rotation in (0, 90, 180, 270) for mirrored in (False, True)]


def expected_orientation(pixels: np.ndarray[Any, Any], rotation: int, mirrored: bool) -> np.ndarray[Any, Any]:
    oriented = np.fliplr(pixels) if mirrored else pixels
    return np.rot90(oriented, k=-(rotation // 90))  # negative k: clockwise


@pytest.mark.parametrize(("rotation", "mirrored"), ORIENTATIONS)
def test_all_eight_orientations_of_an_asymmetric_pattern(rotation: int, mirrored: bool) -> None:
    pattern = synthetic.quadrants(96, 64)
    pattern[5:9, 3:30] = (0, 0, 0)  # a bar near the top-left makes even the quadrant layout unambiguous
    shown = pixels_of(render(synthetic.png_bytes(pattern), rotation=rotation, mirrored=mirrored))
    assert np.array_equal(shown, expected_orientation(pattern, rotation, mirrored))


def test_the_eight_orientations_are_all_different() -> None:
    data = synthetic.png_bytes(synthetic.quadrants(96, 64))
    renders = {render(data, rotation=r, mirrored=m) for r, m in ORIENTATIONS}
    assert len(renders) == 8


# The file's EXIF orientation (EXIF 2.3, tag 274): how the stored rows and columns become the upright
# picture. Here the other way round, from upright to stored, written independently of Pillow with numpy.
UPRIGHT_TO_STORED = {
    1: lambda up: up,
    2: np.fliplr,
    3: lambda up: np.rot90(up, 2),
    4: np.flipud,
    5: lambda up: up.transpose(1, 0, 2),  # row 0 is the left edge, column 0 the top
    6: lambda up: np.rot90(up, 1),  # row 0 is the right edge: shown turned 90 degrees clockwise
    7: lambda up: up[::-1, ::-1].transpose(1, 0, 2),
    8: lambda up: np.rot90(up, -1),
}


def with_exif_orientation(pixels: np.ndarray[Any, Any], orientation: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, fmt, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])  # Pillow 13 turns a TIFF itself while loading it
@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_files_exif_orientation_is_applied_before_the_stored_one(orientation: int, fmt: str) -> None:
    upright = synthetic.quadrants(96, 64)
    upright[5:9, 3:30] = (0, 0, 0)
    data = with_exif_orientation(UPRIGHT_TO_STORED[orientation](upright), orientation, fmt)
    facts = analyze(data)
    assert (facts.width, facts.height) == (96, 64)  # the upright size, whichever way the file stores it
    assert facts.attributes.get("exif_orientation", 1) == orientation
    assert np.array_equal(pixels_of(render(data)), upright)
    for rotation, mirrored in ((90, False), (270, True)):
        shown = pixels_of(render(data, rotation=rotation, mirrored=mirrored))
        assert np.array_equal(shown, expected_orientation(upright, rotation, mirrored))


def test_a_damaged_exif_block_does_not_refuse_the_photo() -> None:
    out = io.BytesIO()
    Image.fromarray(synthetic.quadrants(96, 64)).save(
        out, "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff"
    )
    facts = analyze(out.getvalue())
    assert (facts.width, facts.height) == (96, 64) and "exif_orientation" not in facts.attributes


# ------------------------------------------------------------------------------------------------
# Size and watermark


def test_thumbnail_long_edge_and_jpeg() -> None:
    data = synthetic.png_bytes(synthetic.panoramic(1200, 600))
    (out,) = render_decoded(decode(data), [RenderRequest(256, 90, False, MARK)])
    with Image.open(io.BytesIO(out)) as img:
        assert (img.format, img.size) == ("JPEG", (128, 256))


@pytest.mark.parametrize("position", ["bottom-left", "bottom-right", "top-left", "top-right", "center"])
def test_watermark_changes_its_region_and_nothing_else(position: str) -> None:
    mark = Watermark("NOT FOR DIAGNOSIS", position=position)
    data = synthetic.png_bytes(synthetic.intraoral(320, 240, bits=12))
    plain = pixels_of(render(data, size=256)).astype(np.int32)
    stamped = pixels_of(render(data, size=256, watermark=mark)).astype(np.int32)
    left, top, right, bottom = watermark_box(mark, plain.shape[1], plain.shape[0])
    inside = np.abs(stamped[top:bottom, left:right] - plain[top:bottom, left:right])
    assert inside.mean() > 20
    outside = stamped.copy()
    outside[top:bottom, left:right] = plain[top:bottom, left:right]
    assert np.array_equal(outside, plain)


def test_watermark_with_logo_turns_a_grey_thumbnail_into_colour() -> None:
    logo = np.zeros((20, 20, 4), np.uint8)
    logo[..., 0] = 255
    logo[..., 3] = 255
    mark = Watermark("NOT FOR DIAGNOSIS", logo_png=synthetic.png_bytes(logo))
    data = synthetic.png_bytes(synthetic.intraoral(320, 240, bits=12))
    with Image.open(io.BytesIO(render(data, size=256, watermark=mark))) as img:
        assert img.mode == "RGB"
        left, top, _right, bottom = watermark_box(mark, img.width, img.height)
        red, green, _blue = np.asarray(img)[(top + bottom) // 2, left + 4].astype(int)
    assert red - green > 100


def test_watermark_version_changes_with_every_setting() -> None:
    versions = {
        MARK.version,
        Watermark("OTHER").version,
        Watermark("NOT FOR DIAGNOSIS", position="top-right").version,
        Watermark("NOT FOR DIAGNOSIS", opacity=0.5).version,
        Watermark("NOT FOR DIAGNOSIS", logo_png=b"\x89PNG...").version,
    }
    assert len(versions) == 5


@pytest.mark.parametrize("fmt", ["JPG", "PNG", "TIF"])
def test_export_formats(fmt: str) -> None:
    data = synthetic.png_bytes(synthetic.quadrants(96, 64))
    out = render(data, fmt=fmt, rotation=90, quality=95)
    with Image.open(io.BytesIO(out)) as img:
        assert img.format == {"JPG": "JPEG", "PNG": "PNG", "TIF": "TIFF"}[fmt]
        assert img.size == (64, 96)


# ------------------------------------------------------------------------------------------------
# Bad input: the reason is named


def _truncated_jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(synthetic.photo(200, 150)).save(out, "JPEG")
    return out.getvalue()[:-400]


def _bad_crc_png() -> bytes:
    data = bytearray(synthetic.png_bytes(synthetic.intraoral(60, 40)))
    data[40] ^= 0xFF  # inside IDAT: its CRC no longer matches
    return bytes(data)


PNG16 = synthetic.png_bytes(synthetic.intraoral(60, 40))
DICOM = synthetic.dicom_bytes(synthetic.intraoral(60, 40), bits_stored=12)
BAD_FILES = {
    "empty": (b"", "empty"),
    "text": (b"hello, this is not an image", "not an image"),
    "gif": (b"GIF89a" + b"\x00" * 100, "unsupported image format GIF"),
    "bmp": (b"BM" + b"\x00" * 100, "unsupported image format BMP"),
    "png cut in its pixels": (PNG16[: len(PNG16) // 2], "truncated PNG"),
    "png without IEND": (PNG16[:-12], "PNG"),
    "png with a bad CRC": (_bad_crc_png(), "PNG"),
    "png header only": (PNG16[:20], "PNG"),
    "jpeg cut short": (_truncated_jpeg(), "truncated JPEG"),
    "tiff cut short": (synthetic.tiff_bytes(synthetic.intraoral(60, 40))[:2000], "TIFF"),
    "dicom cut in its pixels": (DICOM[:-500], "DICOM"),
    "dicom without pixels": (DICOM[:400], "DICOM"),
    "float tiff": (b"II*\x00" + b"\x00" * 4, "TIFF"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_are_refused_with_a_reason(name: str) -> None:
    data, reason = BAD_FILES[name]
    with pytest.raises(ImagingError, match=reason):
        analyze(data)


def test_dicom_bits_above_bits_stored_are_ignored() -> None:
    values = synthetic.intraoral(64, 48, bits=12)
    noisy = values | np.uint16(0xF000)  # overlay bits or garbage above BitsStored
    decoded = decode(synthetic.dicom_bytes(noisy, bits_stored=12))
    assert decoded.pixels is not None
    assert np.array_equal(decoded.pixels, values)
