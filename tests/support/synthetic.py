"""Synthetic dental images and exact file writers, for the tests and the benchmarks (`bench/`).

No real patient image may ship with the project, and Pillow cannot write every file this bridge must read
(16-bit colour PNG and TIFF, PNG sBIT, DICOM), so these writers build the files byte by byte from a numpy
array. The array is the ground truth a round trip through the bridge is compared with.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np

Pixels = np.ndarray[Any, Any]


# --------------------------------------------------------------------------------------------------
# Pixels


def panoramic(width: int = 3000, height: int = 1500, bits: int = 12, seed: int = 0) -> Pixels:
    """A 12-bit grey panoramic-like image: a bright arch of 'teeth' on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    arch = np.exp(
        -(((yy - height * 0.55 + 0.25 * height * np.cos(np.pi * xx / width)) / (height * 0.12)) ** 2)
    )
    teeth = 0.5 + 0.5 * np.cos(xx / width * 2 * np.pi * 16) ** 8
    top = (1 << bits) - 1
    values: Pixels = top * (0.15 + 0.7 * arch * teeth) + rng.normal(0, top * 0.02, (height, width))
    return np.clip(values, 0, top).astype(np.uint16)


def intraoral(width: int = 1300, height: int = 1000, bits: int = 12, seed: int = 1) -> Pixels:
    """A grey intra-oral-like image: two 'teeth' with roots and noise, `bits` deep."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tooth = np.zeros((height, width), np.float32)
    for centre in (0.33, 0.67):
        tooth += np.exp(-(((xx - width * centre) / (width * 0.12)) ** 2)) * (yy < height * 0.85)
    top = (1 << bits) - 1
    values = top * (0.1 + 0.75 * np.clip(tooth, 0, 1)) + rng.normal(0, top * 0.02, (height, width))
    return np.clip(values, 0, top).astype(np.uint16)


def photo(width: int = 4000, height: int = 3000, seed: int = 2) -> Pixels:
    """An 8-bit colour 'intra-oral photo': pink gums, white teeth, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    teeth = (np.cos(xx / width * 2 * np.pi * 8) > 0.2) & (np.abs(yy - height / 2) < height * 0.2)
    rgb = np.empty((height, width, 3), np.float32)
    rgb[...] = (190, 90, 110)
    rgb[teeth] = (235, 230, 215)
    rgb += rng.normal(0, 6, (height, width, 1))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def quadrants(width: int = 96, height: int = 64) -> Pixels:
    """An asymmetric RGB test pattern: red, green, blue and white quadrants (top-left clockwise).

    Any rotation or mirroring moves the colours to different corners, so each of the eight orientations
    gives a different picture.
    """
    rgb = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    rgb[:h, :w] = (255, 0, 0)
    rgb[:h, w:] = (0, 255, 0)
    rgb[h:, w:] = (0, 0, 255)
    rgb[h:, :w] = (255, 255, 255)
    return rgb


# --------------------------------------------------------------------------------------------------
# PNG


_PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> colour type (grey, grey+alpha, RGB, RGBA)


def _channels(pixels: Pixels) -> int:
    return 1 if pixels.ndim == 2 else int(pixels.shape[2])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(pixels: Pixels, *, sbit: int | None = None) -> bytes:
    """A PNG of `pixels` (uint8 or uint16; 1-4 channels), with an sBIT chunk when `sbit` is given."""
    channels = _channels(pixels)
    depth = 16 if pixels.dtype == np.uint16 else 8
    height, width = pixels.shape[:2]
    raw = np.ascontiguousarray(pixels, dtype=">u2" if depth == 16 else np.uint8).reshape(height, -1)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), raw.view(np.uint8).reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, depth, _PNG_COLOR_TYPES[channels], 0, 0, 0)
    body = _png_chunk(b"IHDR", header)
    if sbit is not None:
        colour_channels = 1 if channels <= 2 else 3
        alpha = [depth] if channels in (2, 4) else []
        body += _png_chunk(b"sBIT", bytes([sbit] * colour_channels + alpha))
    body += _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
    return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# TIFF (baseline, uncompressed, one strip)


def tiff_bytes(pixels: Pixels) -> bytes:
    """An uncompressed little-endian TIFF of `pixels` (uint8 or uint16; grey, RGB or RGBA)."""
    channels = _channels(pixels)
    depth = 16 if pixels.dtype == np.uint16 else 8
    height, width = pixels.shape[:2]
    data = np.ascontiguousarray(pixels, dtype="<u2" if depth == 16 else np.uint8).tobytes()
    data_offset = 8
    bits_offset = data_offset + len(data)
    bits_blob = struct.pack(f"<{channels}H", *([depth] * channels)) if channels > 1 else b""
    ifd_offset = bits_offset + len(bits_blob)
    ifd_offset += ifd_offset % 2
    entries: list[tuple[int, int, int, int]] = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, channels, bits_offset if channels > 1 else depth),
        (259, 3, 1, 1),
        (262, 3, 1, 1 if channels < 3 else 2),
        (273, 4, 1, data_offset),
        (277, 3, 1, channels),
        (278, 4, 1, height),
        (279, 4, 1, len(data)),
        (284, 3, 1, 1),
    ]
    if channels in (2, 4):
        entries.append((338, 3, 1, 2))  # ExtraSamples: unassociated alpha
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed_value = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed_value
    ifd += struct.pack("<I", 0)
    padding = b"\x00" * (ifd_offset - bits_offset - len(bits_blob))
    return b"II*\x00" + struct.pack("<I", ifd_offset) + data + bits_blob + padding + ifd


# --------------------------------------------------------------------------------------------------
# DICOM


def dicom_bytes(
    pixels: Pixels,
    *,
    bits_stored: int | None = None,
    photometric: str | None = None,
    window: tuple[float, float] | None = None,
    modality: str = "IO",
    jpeg_baseline: bool = False,
    rescale: tuple[float, float] | None = None,
) -> bytes:
    """A DICOM Part 10 file of `pixels`: native little endian, or JPEG baseline (8-bit, via Pillow)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    colour = pixels.ndim == 3
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "SYNTHETIC"
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    allocated = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if colour:
        ds.PlanarConfiguration = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if jpeg_baseline:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=95)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = photometric or ("YBR_FULL_422" if colour else "MONOCHROME2")
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([out.getvalue()])
        ds["PixelData"].VR = "OB"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2" if allocated == 16 else np.uint8).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
