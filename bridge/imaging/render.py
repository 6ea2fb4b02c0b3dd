"""Rendering stored images for display: display mapping, orientation, size, watermark. Process pool."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps


def to_display(img: Image.Image) -> Image.Image:
    """An 8-bit image for display; 16-bit grey is windowed on its 0.5..99.5 percentiles with a LUT."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a: np.ndarray[Any, Any] = np.asarray(img).astype(np.uint16, copy=False)
        lo, hi = np.percentile(a, (0.5, 99.5))
        hi = max(hi, lo + 1)
        lut = np.clip((np.arange(65536, dtype=np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(
            np.uint8
        )
        return Image.fromarray(lut[a])
    return img.convert("RGB")


def orient(img: Image.Image, rotation: int, mirrored: bool) -> Image.Image:
    """Apply the clinician's orientation: mirror (left-right) first, then rotate clockwise."""
    if mirrored:
        img = ImageOps.mirror(img)
    if rotation:
        img = img.rotate(-rotation, expand=True)
    return img


def stamp(img: Image.Image, text: str) -> Image.Image:
    """Stamp the watermark text at the bottom left, readable on dark and light images."""
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), text)
    y = img.height - (box[3] - box[1]) - 4
    draw.rectangle((0, y - 2, box[2] + 6, img.height), fill=(0, 0, 0))
    draw.text((3, y - 1), text, fill=(255, 255, 255))
    return img


def render_jpeg(
    path: str, *, rotation: int, mirrored: bool, size: int, watermark: str, quality: int = 85
) -> bytes:
    """A watermarked JPEG whose long edge is `size`, oriented as the clinician left the image."""
    with Image.open(path) as src:
        img = to_display(src)
        img.thumbnail((size, size), Image.Resampling.BICUBIC)
    img = stamp(orient(img, rotation, mirrored), watermark)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()
