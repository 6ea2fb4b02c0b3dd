"""Store rows for service-level tests: an image's metadata as the service adds it. The store's rows never
look at the file, so no file is written; tests that need real pixels use tests/support/dicomfiles.py."""

from __future__ import annotations

from bridge.model import Category, NewImage


def image_row(
    *, study_uid: str = "", sop_instance_uid: str = "", tooth_numbers: tuple[int, ...] = ()
) -> NewImage:
    """A small intra-oral PNG's metadata, with the same bytes (hash) every time: images may share a file."""
    return NewImage(
        sha256="ab" * 32,
        file_ext="png",
        media_type="image/png",
        size_bytes=1,
        width=1,
        height=1,
        bits_stored=8,
        color=False,
        category=Category.INTRAORAL_XRAY,
        study_uid=study_uid,
        sop_instance_uid=sop_instance_uid,
        tooth_numbers=tooth_numbers,
    )
