"""Rendering stored images for display: display mapping, size, orientation, watermark. Process pool.

The order is chosen for speed without changing what a clinician sees:

1. shrink first (Pillow, in the source's own bit depth: 16-bit grey is resampled as 32-bit integers), so
   the following steps touch a 256-pixel image instead of a 3000x1500 one;
2. map deep grey values to 8 bits with a lookup table (numpy indexing, no per-pixel Python): the
   DICOM window when the source has one, otherwise a robust automatic window; MONOCHROME1 inverted;
3. orient: mirror left-right first, then rotate clockwise (exact pixel transposes, no resampling), on
   pixels the decoder has already turned upright by the file's EXIF orientation (a phone's photo);
4. stamp the watermark last, so it is upright and readable whatever the orientation.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bridge.imaging.analyze import Analysis, Decoded, Window, auto_window, decode, describe

# Bump when rendering changes what a thumbnail looks like: it is part of the watermark version, which is
# part of every cache key, so all cached renders are replaced.
RENDER_VERSION = 2  # 2: the file's EXIF orientation is applied before the stored one

FORMATS = {"JPEG": "JPEG", "JPG": "JPEG", "PNG": "PNG", "TIF": "TIFF", "TIFF": "TIFF"}

# The watermark's text height as a share of the output's long edge (12 px on a 256 thumbnail).
WATERMARK_TEXT_SHARE = 0.045
WATERMARK_MIN_PX = 9


@dataclass(frozen=True)
class Watermark:
    """What is stamped on every rendering sent to a PMS, so it cannot pass for a diagnostic image."""

    text: str
    logo_png: bytes | None = None
    position: str = "bottom-left"
    opacity: float = 0.8

    @property
    def version(self) -> str:
        """A short hash of everything that changes the stamp (and of RENDER_VERSION): a cache-key part."""
        facts = {
            "render": RENDER_VERSION,
            "text": self.text,
            "logo": hashlib.sha256(self.logo_png).hexdigest() if self.logo_png else "",
            "position": self.position,
            "opacity": round(self.opacity, 3),
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RenderRequest:
    """One rendering of an image: long edge (None = full size), orientation, stamp, file format."""

    size: int | None
    rotation: int = 0
    mirrored: bool = False
    watermark: Watermark | None = None
    fmt: str = "JPEG"
    quality: int = 85


# --------------------------------------------------------------------------------------------------
# Display mapping


@functools.lru_cache(maxsize=32)
def window_lut(
    entries: int, window: Window, slope: float, intercept: float, offset: int, invert: bool
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The lookup table from stored values (0 .. entries-1) to display grey levels.

    Stored value i means modality value v = (i - offset) * slope + intercept (rescale); the window is the
    DICOM VOI function on v (PS3.3 C.11.2.1.2): LINEAR, LINEAR_EXACT or SIGMOID.
    """
    v = (np.arange(entries, dtype=np.float32) - offset) * np.float32(slope) + np.float32(intercept)
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (v - c) / w))
    elif window.function == "LINEAR_EXACT":
        y = (v - c) / w + 0.5
    elif w <= 1:
        y = (v > c - 0.5).astype(np.float32)
    else:
        y = (v - (c - 0.5)) / (w - 1) + 0.5
    lut: np.ndarray[Any, np.dtype[np.uint8]] = np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.subtract(255, lut, dtype=np.uint8) if invert else lut


def display_lut(decoded: Decoded) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
    """The lookup table for `decoded`, or None when its pixels are display-ready (8-bit, no window)."""
    if decoded.color:
        return None
    identity = decoded.slope == 1.0 and decoded.intercept == 0.0 and decoded.offset == 0
    if not decoded.deep and decoded.window is None and identity and not decoded.invert:
        return None
    if decoded.deep:
        window = decoded.window or auto_window(decoded)
        entries = 1 << decoded.value_bits  # 4096 for 12-bit DICOM: a sixteenth of the work
    else:
        # The full 8-bit range of modality values: stored 0 .. 255 are values (i - offset) * slope + intercept
        # (signed data is stored shifted by its offset; a negative slope still spans 256 steps).
        window = decoded.window or Window(
            (127.5 - decoded.offset) * decoded.slope + decoded.intercept, 256 * abs(decoded.slope)
        )
        entries = 256
    return window_lut(entries, window, decoded.slope, decoded.intercept, decoded.offset, decoded.invert)


def _base_image(decoded: Decoded) -> Image.Image:
    """The decoded pixels as a Pillow image it can resample: RGB, L, or I (32-bit) for deep grey."""
    if decoded.pixels is not None:
        return Image.fromarray(decoded.pixels).convert("I")
    assert decoded.image is not None
    return decoded.image


def fit(width: int, height: int, size: int | None) -> tuple[int, int]:
    """Width and height with the long edge at most `size`, aspect kept (never enlarged)."""
    if size is None or max(width, height) <= size:
        return width, height
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _display(
    base: Image.Image, lut: np.ndarray[Any, np.dtype[np.uint8]] | None, size: int | None
) -> Image.Image:
    """Shrink `base` to `size`, then map it to 8 bits through `lut`."""
    target = fit(base.width, base.height, size)
    img = base if target == base.size else base.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if lut is None:
        return img if img.mode in ("L", "RGB") else img.convert("L")
    values = np.asarray(img)
    if values.dtype != np.uint8:
        values = np.clip(values, 0, len(lut) - 1)
    return Image.fromarray(lut[values])


# --------------------------------------------------------------------------------------------------
# Orientation


def orient(img: Image.Image, rotation: int, mirrored: bool) -> Image.Image:
    """Apply the clinician's orientation: mirror left-right first, then rotate clockwise by `rotation`.

    Pillow's ROTATE_* transposes turn counter-clockwise, hence 90 clockwise is ROTATE_270.
    """
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270, got {rotation}")
    if mirrored:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    turn = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    return img.transpose(turn[rotation]) if rotation else img


# --------------------------------------------------------------------------------------------------
# Watermark


@dataclass(frozen=True)
class _Stamp:
    patch: Image.Image  # RGB
    mask: Image.Image  # L: the patch's opacity
    origin: tuple[int, int]
    colour: bool  # the patch has colour (a logo), so a grey image must become RGB


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _bbox(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> tuple[int, int, int, int]:
    left, top, right, bottom = font.getbbox(text)
    return math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)


@functools.lru_cache(maxsize=64)
def _stamp(mark: Watermark, width: int, height: int) -> _Stamp:
    """The watermark patch for an output of `width` x `height` (cached: the same for every thumbnail)."""
    px = max(WATERMARK_MIN_PX, round(max(width, height) * WATERMARK_TEXT_SHARE))
    font = _font(px)
    box = _bbox(font, mark.text)
    while box[2] - box[0] > width * 0.92 and px > WATERMARK_MIN_PX:  # shrink to fit narrow images
        px -= 1
        font = _font(px)
        box = _bbox(font, mark.text)
    pad = max(2, px // 4)
    text_w, text_h = box[2] - box[0], box[3] - box[1]
    band_h = text_h + 2 * pad
    logo: Image.Image | None = None
    if mark.logo_png:
        with Image.open(io.BytesIO(mark.logo_png)) as src:
            logo = src.convert("RGBA")
        logo_h = max(1, band_h - 2 * pad)
        logo = logo.resize(
            (max(1, round(logo.width * logo_h / logo.height)), logo_h), Image.Resampling.LANCZOS
        )
    logo_w = logo.width + pad if logo is not None else 0
    band_w = min(width, text_w + logo_w + 2 * pad)
    band_h = min(height, band_h)
    alpha = round(255 * mark.opacity)
    patch = Image.new("RGBA", (band_w, band_h), (0, 0, 0, round(alpha * 0.6)))
    if logo is not None:
        faded = logo.copy()
        faded.putalpha(logo.getchannel("A").point(lambda a: a * alpha // 255))
        patch.alpha_composite(faded, (pad, pad))
    draw = ImageDraw.Draw(patch)
    draw.text((pad + logo_w - box[0], pad - box[1]), mark.text, font=font, fill=(255, 255, 255, alpha))
    x = {"left": 0, "right": width - band_w}.get(mark.position.rsplit("-", 1)[-1], (width - band_w) // 2)
    y = {"top": 0, "bottom": height - band_h}.get(mark.position.split("-", 1)[0], (height - band_h) // 2)
    colour = logo is not None and not _is_grey(logo)
    return _Stamp(patch.convert("RGB"), patch.getchannel("A"), (x, y), colour)


def _is_grey(img: Image.Image) -> bool:
    rgb = np.asarray(img.convert("RGB"))
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def watermark_box(mark: Watermark, width: int, height: int) -> tuple[int, int, int, int]:
    """Where the watermark lands on an output of this size: (left, top, right, bottom)."""
    stamp = _stamp(mark, width, height)
    x, y = stamp.origin
    return x, y, x + stamp.patch.width, y + stamp.patch.height


def stamp(img: Image.Image, mark: Watermark) -> Image.Image:
    """`img` with the watermark blended in at its configured position and opacity."""
    found = _stamp(mark, img.width, img.height)
    if found.colour and img.mode != "RGB":
        img = img.convert("RGB")
    patch = found.patch if img.mode == "RGB" else found.patch.convert(img.mode)
    img = img.copy() if img.readonly else img
    img.paste(patch, found.origin, found.mask)
    return img


# --------------------------------------------------------------------------------------------------
# Entry points (these run in the process pool)


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    pil_format = FORMATS[fmt.upper()]
    if pil_format == "JPEG":
        # Always 24-bit: PMS thumbnail folders (TigerView-style) expect 24-bit JPEGs, and some PMS viewers
        # mis-render 8-bit greyscale ones. The cost at thumbnail size is negligible.
        img.convert("RGB").save(out, "JPEG", quality=quality)
    else:
        img.save(out, pil_format)
    return out.getvalue()


def render_decoded(decoded: Decoded, requests: Sequence[RenderRequest]) -> list[bytes]:
    """Every requested rendering of one decoded image (the decode is shared)."""
    base = _base_image(decoded)
    lut = display_lut(decoded)
    rendered = []
    for req in requests:
        img = orient(_display(base, lut, req.size), req.rotation, req.mirrored)
        if req.watermark is not None:
            img = stamp(img, req.watermark)
        rendered.append(_encode(img, req.fmt, req.quality))
    return rendered


def render_file(path: str, requests: Sequence[RenderRequest]) -> list[bytes]:
    """Renderings of a stored file (a thumbnail that was not rendered at ingest, an export)."""
    with open(path, "rb") as fh:
        data = fh.read()
    sizes = [req.size for req in requests if req.size is not None]
    draft = max(sizes) if sizes and len(sizes) == len(requests) else None  # full size: no draft
    return render_decoded(decode(data, draft=draft), requests)


def analyze_and_render(data: bytes, requests: Sequence[RenderRequest]) -> tuple[Analysis, list[bytes]]:
    """Decode once at ingest: the facts to store and the renderings to cache."""
    decoded = decode(data)
    return describe(decoded), render_decoded(decoded, requests)
