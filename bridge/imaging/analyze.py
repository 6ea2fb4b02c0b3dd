"""What an incoming image file is: format, size, bit depth, colour. Runs in the process pool."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bridge.model import Category

MAX_PIXELS = 20_000 * 20_000


class ImagingError(ValueError):
    """The file cannot be ingested; the message names the reason for the sender (a 4xx answer)."""


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


_FORMATS = {"PNG": ("png", "image/png"), "TIFF": ("tif", "image/tiff"), "JPEG": ("jpg", "image/jpeg")}


def is_grey_rgb(pixels: np.ndarray[Any, Any]) -> bool:
    """True when every pixel of an RGB(A) array has equal R, G and B: a grey X-ray saved as colour."""
    rgb = pixels[..., :3]
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def analyze(data: bytes) -> Analysis:
    """Decode `data` fully (a truncated file fails here, before anything is stored) and describe it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            if fmt not in _FORMATS:
                raise ImagingError(
                    f"unsupported image format {fmt or 'unknown'} (PNG, TIFF, JPEG are accepted)"
                )
            if img.width * img.height > MAX_PIXELS:
                raise ImagingError(f"image too large: {img.width}x{img.height}")
            img.load()
            mode = img.mode
            pixels = np.asarray(img)
    except UnidentifiedImageError:
        raise ImagingError("not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError) as exc:
        raise ImagingError(f"corrupt or truncated image: {exc}") from None
    ext, media_type = _FORMATS[fmt]
    color = mode in ("RGB", "RGBA", "CMYK", "YCbCr", "P") and not (pixels.ndim == 3 and is_grey_rgb(pixels))
    bits = 16 if mode.startswith("I;16") or mode == "I" else 8
    category = Category.PHOTO if color else Category.INTRAORAL_XRAY
    return Analysis(ext, media_type, img.width, img.height, bits, color, category)
