"""DICOM test objects built with pydicom: dental objects are in no public sample set, so tests make them.

`dental_dataset` is an intra-oral (or other) image with the patient, study and series a test chooses;
`sensor_xrays` writes files of a sensor's size (for the bench and the tests of an import's memory and
interruption); `sample` finds pydicom's shipped files and the `pydicom-data` package's (offline).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.support import synthetic

IO_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.3"
SC = "1.2.840.10008.5.1.4.1.1.7"


def sample(name: str) -> Path:
    """A sample file of pydicom's wheel or of pydicom-data (resolved offline)."""
    found = get_testdata_file(name)
    assert found is not None, f"sample {name} is not installed (pydicom-data?)"
    return Path(str(found))


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def dental_dataset(
    *,
    patient_id: str = "0042",
    name: str = "Doe^Jane",
    birth_date: str = "19800506",
    sex: str = "F",
    charset: str | None = "ISO_IR 100",
    sop_class: str = IO_PRESENTATION,
    modality: str = "IO",
    study_uid: str | None = None,
    series_uid: str | None = None,
    pixels: np.ndarray[Any, Any] | None = None,
    teeth: list[tuple[str, str, str]] | None = None,
    **attributes: Any,
) -> Dataset:
    """A small 12-bit grey image (intra-oral by default) of one patient; attributes override or add."""
    if pixels is None:
        pixels = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 7) % 4096
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, name, birth_date, sex
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101112", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer, ds.ManufacturerModelName = "Acme", "Sensor 2"
    ds.ContentDate, ds.ContentTime = "20240102", "101500"
    ds.Rows, ds.Columns = pixels.shape[:2]
    colour = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = 8 if pixels.dtype == np.uint8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if teeth:
        ds.PrimaryAnatomicStructureSequence = Sequence([code(*t) for t in teeth])
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(ds))
    return path


def intraoral_object(**attributes: Any) -> Dataset:
    """A complete Digital Intra-Oral X-Ray Image For Presentation as a sensor writes it (dciodvfy-clean):
    tooth 12, maxilla, 20 micrometre pixels."""
    ds = dental_dataset(
        teeth=[("424877001", "SCT", "Permanent maxillary right lateral incisor tooth")],
        ImageType=["ORIGINAL", "PRIMARY", ""],
        PresentationIntentType="FOR PRESENTATION",
        PatientOrientation=["L", "F"],
        BurnedInAnnotation="NO",
        ImageLaterality="R",
        PixelIntensityRelationship="LIN",
        PixelIntensityRelationshipSign=1,
        RescaleIntercept="0",
        RescaleSlope="1",
        RescaleType="US",
        LossyImageCompression="00",
        PresentationLUTShape="IDENTITY",
        WindowCenter="2048",
        WindowWidth="4096",
        DetectorType="DIRECT",
        ImagerPixelSpacing=["0.02", "0.02"],
        PositionerType="NONE",
        AcquisitionContextSequence=Sequence([]),
        AnatomicRegionSequence=Sequence([code("70925003", "SCT", "Maxilla")]),
        **attributes,
    )
    return ds


def sensor_xrays(folder: Path, count: int, patient_id: str, **attributes: Any) -> list[Path]:
    """`count` files of `intraoral_object` at a sensor's size, 1000x1500 pixels of 12 bits (3 MB each, the
    size an import's speed and memory depend on), each a different image, 10 to a study and series."""
    pixels = synthetic.intraoral(1000, 1500, bits=12)
    paths = []
    for index in range(count):
        if index % 10 == 0:
            study, series = str(generate_uid()), str(generate_uid())
        ds = intraoral_object(patient_id=patient_id, study_uid=study, series_uid=series, **attributes)
        ds.PixelData = ((pixels.astype("int32") + index) % 4096).astype("<u2").tobytes()
        ds.Rows, ds.Columns = pixels.shape
        ds.InstanceNumber = index % 10 + 1
        paths.append(write(ds, folder / f"IO{index:05d}.dcm"))
    return paths
