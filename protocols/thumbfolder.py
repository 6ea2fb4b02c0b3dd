"""The files a folder-reading PMS gets per image (TigerView-style thumbnail folders, Smart Image):
the names, the JSON and the CSV. Pure rendering; `bridge.thumbfolders` writes them.

No vendor publishes such a format, so it is ours: `<yyyyMMdd-HHmmss>_<image id>` as the file stem (sorts
by capture time, unique by image id), a JSON document tagged with `FORMAT`, and a one-row CSV in the PMS's
code page for PMS imports that read CSV.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from bridge.model import ImageView, PatientView

FORMAT = "pms-bridge-thumbnail/1"
THUMBNAIL_SUFFIX = ".jpg"
JSON_SUFFIX = ".json"
CSV_SUFFIX = ".csv"
# The files of one image share their stem; in the order they are written, the CSV last (a PMS import
# watching for it must find the set complete) and removed in reverse (it never sees a half set).
SUFFIXES = (THUMBNAIL_SUFFIX, JSON_SUFFIX, CSV_SUFFIX)
CSV_COLUMNS = (
    "image_id",
    "pms_system",
    "pms_id",
    "chart_number",
    "last_name",
    "first_name",
    "birth_date",
    "captured_at",
    "category",
    "tooth_numbers",
    "rotation",
    "mirrored",
    "width",
    "height",
    "color",
    "thumbnail",
    "sha256",
)


def file_stem(image: ImageView) -> str:
    """Sorts by capture time in a file list, unique by image id."""
    when = image.captured_at.strftime("%Y%m%d-%H%M%S") if image.captured_at else "undated"
    return f"{when}_{image.id}"


def metadata(image: ImageView, patient: PatientView, thumbnail: str, watermark: str) -> dict[str, Any]:
    """The JSON written beside a thumbnail. Links are relative to the API's base URL."""
    return {
        "format": FORMAT,
        "patient": {
            "pms_system": patient.pms_system,
            "pms_id": patient.pms_id,
            "chart_number": patient.chart_number,
            "last_name": patient.last_name,
            "first_name": patient.first_name,
            "middle_name": patient.middle_name,
            "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
            "sex": patient.sex.value,
        },
        "image": image.to_json(),
        "thumbnail": {"file": thumbnail, "watermark": watermark},
        "links": {
            "image": f"/api/v1/images/{image.id}",
            "thumbnail": f"/api/v1/images/{image.id}/thumbnail",
            "file": f"/api/v1/images/{image.id}/file",
        },
    }


def csv_bytes(image: ImageView, patient: PatientView, thumbnail: str, encoding: str) -> bytes:
    """One header row and one row, CRLF, in the PMS's code page ("?" for what it cannot hold)."""
    row = {
        "image_id": image.id,
        "pms_system": patient.pms_system or "",
        "pms_id": patient.pms_id or "",
        "chart_number": patient.chart_number or "",
        "last_name": patient.last_name,
        "first_name": patient.first_name,
        "birth_date": patient.birth_date.isoformat() if patient.birth_date else "",
        "captured_at": image.captured_at.isoformat() if image.captured_at else "",
        "category": image.category.value,
        "tooth_numbers": " ".join(str(t) for t in image.tooth_numbers),
        "rotation": image.rotation,
        "mirrored": int(image.mirrored),
        "width": image.width,
        "height": image.height,
        "color": int(image.color),
        "thumbnail": thumbnail,
        "sha256": image.sha256,
    }
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerow(row)
    return out.getvalue().encode(encoding, errors="replace")


def json_bytes(image: ImageView, patient: PatientView, thumbnail: str, watermark: str) -> bytes:
    """The JSON document beside a thumbnail, UTF-8."""
    return json.dumps(metadata(image, patient, thumbnail, watermark), ensure_ascii=False, indent=2).encode()


def image_owner(data: bytes) -> int | None:
    """The store's patient id an image's JSON was written for; None when the bytes are not one of our
    documents (a file the PMS or someone else put there: never ours to remove)."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return None
    image = document.get("image")
    owner = image.get("patient_id") if isinstance(image, dict) else None
    return owner if isinstance(owner, int) and not isinstance(owner, bool) else None
