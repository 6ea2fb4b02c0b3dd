"""A round trip through Orthanc (a real DICOM archive, the Debian package) on loopback: export a patient,
upload every file to Orthanc's REST API, fetch it back, and find the store's pixels and identity.

The test runs its own Orthanc (tests.support.orthanc: a config of its own on free loopback ports, remote
access off, stopped by its process id).
"""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from bridge.dicom.export import export_patient
from bridge.dicom.wrap import decoded_pixels
from bridge.imaging import analyze
from bridge.runtime import Runtime
from tests.support.dental_patient import NAME, ORIGIN, PMS_ID, everything
from tests.support.orthanc import running_orthanc


def call(url: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", "application/dicom")
    with urllib.request.urlopen(request, timeout=60) as response:
        data: bytes = response.read()
        return data


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[str]:
    """The base URL of a fresh Orthanc of this test's own."""
    with running_orthanc(tmp_path / "orthanc") as port:
        yield f"http://127.0.0.1:{port}"


async def test_an_exported_set_survives_a_round_trip_through_orthanc(
    runtime: Runtime, tmp_path: Path, orthanc: str
) -> None:
    patient = await everything(runtime, tmp_path)
    out = tmp_path / "export"
    report = await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=out)
    assert len(report.written) == len(patient.images)
    for written in report.written:
        exported = out.joinpath(*written.file_id).read_bytes()
        answer: dict[str, Any] = json.loads(call(f"{orthanc}/instances", exported))
        assert answer["Status"] == "Success", answer
        fetched = pydicom.dcmread(io.BytesIO(call(f"{orthanc}/instances/{answer['ID']}/file")))
        tags = json.loads(call(f"{orthanc}/instances/{answer['ID']}/simplified-tags"))
        image = await runtime.service.get_image(ORIGIN, written.image_id)
        assert image is not None
        assert (tags["PatientID"], tags["PatientName"]) == (PMS_ID, NAME)
        identity = (tags["StudyInstanceUID"], tags["SeriesInstanceUID"], tags["SOPInstanceUID"])
        assert identity == (image.study_uid, image.series_uid, image.sop_instance_uid)
        stored = runtime.files.path_for(image.sha256, image.file_ext).read_bytes()
        if image.file_ext == "dcm":
            expected = pydicom.dcmread(io.BytesIO(stored)).pixel_array
        else:
            expected = decoded_pixels(analyze.decode(stored))
        assert np.array_equal(fetched.pixel_array, expected), written.file_id
    patients = json.loads(call(f"{orthanc}/patients"))
    assert len(patients) == 1, "Orthanc filed the set under more than one patient"
    studies = json.loads(call(f"{orthanc}/studies"))
    assert len(studies) == len({w.study["StudyInstanceUID"] for w in report.written})
