"""A patient with one image of every kind the DICOM exporter handles, for the export and Orthanc tests.

DICOM originals are imported (a complete intra-oral object, a JPEG 2000 CR, a JPEG colour secondary capture,
a CT series that becomes a volume) and non-DICOM images uploaded (PNG and TIFF X-rays with and without
teeth and pixel spacing, a JPEG photo, a PNG document), all for PMS id 0042.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from bridge.dicom.importer import Importer
from bridge.model import Category, Origin
from bridge.runtime import Runtime
from tests.support import synthetic
from tests.support.dicomfiles import intraoral_object, sample, write

ORIGIN = Origin("dicom", "export", "TEST")
PMS_ID = "0042"
NAME = "Müller^Anna"
REFERENCE_SET = sample("CT_small.dcm").parent / "dicomdirtests"


@dataclass
class Patient:
    """A patient with one image of every kind the exporter handles, by what it should become."""

    patient_id: int
    images: dict[str, int]  # what -> image id


def as_patient(source: Path, target: Path) -> Path:
    """A copy of a sample file as our patient's (the sample's encoding and pixel data kept)."""
    ds = pydicom.dcmread(source)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = PMS_ID, NAME, "19800506", "F"
    ds.SpecificCharacterSet = "ISO_IR 100"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def png(pixels: np.ndarray[Any, Any], dpi: float | None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", **({"dpi": (dpi, dpi)} if dpi else {}))
    return out.getvalue()


def tiff(pixels: np.ndarray[Any, Any], dpi: float) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "TIFF", dpi=(dpi, dpi))
    return out.getvalue()


def jpeg(rgb: np.ndarray[Any, Any]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=90)
    return out.getvalue()


async def everything(rt: Runtime, tmp_path: Path) -> Patient:
    """Import DICOM originals and upload non-DICOM images for one patient (PMS id 0042)."""
    media = tmp_path / "media"
    write(intraoral_object(patient_id=PMS_ID, name=NAME), media / "io.dcm")
    as_patient(sample("RG3_J2KR.dcm"), media / "cr_j2k.dcm")
    as_patient(sample("SC_rgb_dcmtk_+eb+cy+np.dcm"), media / "sc_jpeg.dcm")
    for path in sorted((REFERENCE_SET / "98892001" / "CT5N").iterdir()):
        as_patient(path, media / "ct" / path.name)
    report = await Importer(rt, ORIGIN).run([(str(media), "media")])
    assert report.errors == [], report.errors
    images = {Path(i.path).stem if i.files == 1 else "ct_volume": i.image_id for i in report.imported}
    patient_id = report.imported[0].patient_id
    intraoral = synthetic.intraoral(320, 240, bits=12)
    uploads: list[tuple[str, bytes, dict[str, Any]]] = [
        ("io_png", png(intraoral, 1270), {"category": Category.INTRAORAL_XRAY, "tooth_numbers": (36, 37)}),
        ("io_png_no_teeth", png(intraoral, 1270), {"category": Category.INTRAORAL_XRAY}),
        ("io_png_no_spacing", png(intraoral, None), {"category": Category.INTRAORAL_XRAY}),
        (
            "pano_png",
            png(synthetic.panoramic(600, 300), 254),
            {"category": Category.PANORAMIC, "rotation": 180},
        ),
        (
            "ceph_tiff",
            tiff(synthetic.intraoral(300, 360, bits=12), 300),
            {"category": Category.CEPHALOMETRIC},
        ),
        ("photo_jpeg", jpeg(synthetic.photo(160, 120)), {"category": Category.PHOTO}),
        ("document_png", png(np.full((60, 80), 200, np.uint8), None), {"category": Category.DOCUMENT}),
    ]
    for name, data, metadata in uploads:
        (added,) = await rt.imaging.ingest_all(rt.service, ORIGIN, patient_id, [(name, data)], **metadata)
        images[name] = added.id
    return Patient(patient_id, images)
