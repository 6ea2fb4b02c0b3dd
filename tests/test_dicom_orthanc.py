"""A round trip through Orthanc (a real DICOM archive, the Debian package) on loopback: export a patient,
upload every file to Orthanc's REST API, fetch it back, and find the store's pixels and identity.

The test runs its own Orthanc with a config of its own on free loopback ports (remote access off) and stops
it by its process id.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
import urllib.error
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
from tests.conftest import free_port
from tests.support.dental_patient import NAME, ORIGIN, PMS_ID, everything

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


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
    home = tmp_path / "orthanc"
    home.mkdir()
    config = {
        "Name": "pms-bridge-test",
        "HttpPort": free_port(),
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(home / "data"),
        "IndexDirectory": str(home / "data"),
        "Plugins": [],
    }
    (home / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    url = f"http://127.0.0.1:{config['HttpPort']}"
    with open(home / "orthanc.log", "wb") as log:
        process = subprocess.Popen(
            [ORTHANC, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                call(f"{url}/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / "orthanc.log").read_text(errors="replace")) from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)


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
