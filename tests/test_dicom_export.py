"""DICOM export on SQLite and PostgreSQL, checked by independent tools: dciodvfy, dcentvfy, dcmftest, dcmmkdir
(dcmtk) and pydicom's File-set reader; pixels and identity against the store.

dciodvfy's and dcentvfy's exit codes are not reliable (reference/dicom.md): their output is what is checked.
dcmmkdir is always told to write its DICOMDIR elsewhere (+D): without it, it renames or deletes ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet

from bridge.dicom import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from bridge.dicom.export import ExportRefused, export_patient
from bridge.dicom.importer import Importer
from bridge.dicom.wrap import decoded_pixels
from bridge.imaging import analyze
from bridge.runtime import Runtime
from tests.support.dental_patient import NAME, ORIGIN, PMS_ID, everything
from tests.support.dicomfiles import intraoral_object, write

FILE_ID = re.compile(r"[A-Z0-9_]{1,8}")


def errors_of(*command: str, cwd: Path | None = None) -> list[str]:
    """The Error (and, for dcentvfy, Warning) lines of a dicom3tools validator's output."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    lines = (result.stdout + result.stderr).splitlines()
    wanted = ("Error", "Warning") if command[0] == "dcentvfy" else ("Error",)
    return [line for line in lines if line.startswith(wanted)]


def validate(root: Path, *, dental: bool) -> list[Path]:
    """Every independent check of a file set; the files it holds."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    assert files
    for path in [root / "DICOMDIR", *files]:
        assert errors_of("dciodvfy", str(path)) == [], path
        if dental:
            assert errors_of("dciodvfy", "-profile", "Dental", str(path)) == [], path
        assert all(FILE_ID.fullmatch(part) for part in path.relative_to(root).parts), path
    assert errors_of("dcentvfy", *map(str, files)) == []
    check = subprocess.run(
        ["dcmftest", "DICOMDIR", *(str(f.relative_to(root)) for f in files)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and check.stdout.count("yes: ") == len(files) + 1, check.stdout
    ours = hashlib.sha256((root / "DICOMDIR").read_bytes()).hexdigest()
    elsewhere = root.parent / f"{root.name}-dcmmkdir"
    elsewhere.mkdir()
    profile = "-Pde" if dental else "-Pgp"
    rebuilt = subprocess.run(
        ["dcmmkdir", profile, "-nb", "-w", "+D", str(elsewhere / "DICOMDIR"), "+r", "+id", ".", "PT000000"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert rebuilt.returncode == 0 and rebuilt.stdout + rebuilt.stderr == "", rebuilt.stderr
    assert hashlib.sha256((root / "DICOMDIR").read_bytes()).hexdigest() == ours, (
        "dcmmkdir touched our DICOMDIR"
    )
    with read_file_set(root / "DICOMDIR") as fileset:
        assert sorted(Path(instance.path) for instance in fileset) == files
        for instance in fileset:
            assert instance.load().SOPInstanceUID == instance.SOPInstanceUID
    return files


@contextlib.contextmanager
def read_file_set(path: Path) -> Iterator[FileSet]:
    """pydicom's File-set reader, which warns when a referenced file is missing (an error here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fileset = FileSet(path)
    try:
        yield fileset
    finally:
        fileset._stage["t"].cleanup()  # its staging folder is otherwise left to the garbage collector


def by_image(report_written: list[Any]) -> dict[int, Any]:
    return {w.image_id: w for w in report_written}


async def test_a_general_purpose_file_set_passes_every_independent_check(
    runtime: Runtime, tmp_path: Path
) -> None:
    patient = await everything(runtime, tmp_path)
    out = tmp_path / "export"
    report = await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=out)
    assert report.errors == [] and report.skipped == []
    files = validate(out, dental=False)
    assert len(files) == len(patient.images) == 11
    written = by_image(report.written)
    kinds = {
        what: (written[image].sop_class_uid, written[image].how) for what, image in patient.images.items()
    }
    assert kinds == {
        "io": ("1.2.840.10008.5.1.4.1.1.1.3", "original"),
        "cr_j2k": ("1.2.840.10008.5.1.4.1.1.1", "original"),
        "sc_jpeg": ("1.2.840.10008.5.1.4.1.1.7", "original"),
        "ct_volume": ("1.2.840.10008.5.1.4.1.1.2.2", "original"),
        "io_png": ("1.2.840.10008.5.1.4.1.1.1.3", "wrapped"),
        "io_png_no_teeth": ("1.2.840.10008.5.1.4.1.1.1.1", "wrapped"),
        "io_png_no_spacing": ("1.2.840.10008.5.1.4.1.1.7", "wrapped"),
        "pano_png": ("1.2.840.10008.5.1.4.1.1.1.1", "wrapped"),
        "ceph_tiff": ("1.2.840.10008.5.1.4.1.1.1.1", "wrapped"),
        "photo_jpeg": ("1.2.840.10008.5.1.4.1.1.77.1.4", "wrapped"),
        "document_png": ("1.2.840.10008.5.1.4.1.1.7", "wrapped"),
    }
    assert "no known pixel spacing" in written[patient.images["io_png_no_spacing"]].note
    directory = pydicom.dcmread(out / "DICOMDIR")
    assert {record.SpecificCharacterSet for record in directory.DirectoryRecordSequence} == {"ISO_IR 100"}
    for path in [out / "DICOMDIR", *files]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert ds.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        if path.name != "DICOMDIR":
            assert ds.SpecificCharacterSet == "ISO_IR 100"
            assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == (
                PMS_ID,
                NAME,
                "19800506",
                "F",
            )


async def test_exported_pixels_and_identity_are_the_stores(runtime: Runtime, tmp_path: Path) -> None:
    patient = await everything(runtime, tmp_path)
    out = tmp_path / "export"
    report = await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=out)
    for what, image_id in patient.images.items():
        item = by_image(report.written)[image_id]
        exported = pydicom.dcmread(out.joinpath(*item.file_id))
        image = await runtime.service.get_image(ORIGIN, image_id)
        assert image is not None
        stored = runtime.files.path_for(image.sha256, image.file_ext).read_bytes()
        assert exported.SOPInstanceUID == image.sop_instance_uid, what
        assert (exported.StudyInstanceUID, exported.SeriesInstanceUID) == (
            image.study_uid,
            image.series_uid,
        ), what
        if image.file_ext == "dcm":
            source = pydicom.dcmread(io.BytesIO(stored))
            expected = source.pixel_array  # pydicom's decode: YBR JPEG comes out as RGB
            assert np.array_equal(exported.pixel_array, expected), what
            if what == "cr_j2k":  # tags kept: a few the CR file carries
                assert (exported.Manufacturer, exported.get("KVP")) == (
                    source.Manufacturer,
                    source.get("KVP"),
                )
        else:
            decoded = analyze.decode(stored)
            assert np.array_equal(exported.pixel_array, decoded_pixels(decoded)), what
    io_png = pydicom.dcmread(out.joinpath(*by_image(report.written)[patient.images["io_png"]].file_id))
    teeth = [(c.CodeValue, c.CodingSchemeDesignator) for c in io_png.PrimaryAnatomicStructureSequence]
    assert teeth == [("866006002", "SCT"), ("863898000", "SCT")]  # 36 and 37
    assert (io_png.ImageLaterality, io_png.AnatomicRegionSequence[0].CodeMeaning) == ("L", "Mandible")
    assert [float(v) for v in io_png.ImagerPixelSpacing] == [0.02, 0.02]
    pano = pydicom.dcmread(out.joinpath(*by_image(report.written)[patient.images["pano_png"]].file_id))
    assert list(pano.PatientOrientation) == ["R", "H"]  # stored upside down: the clinician rotated it 180


async def test_a_dental_file_set_holds_the_radiographs_and_passes_the_dental_profile(
    runtime: Runtime, tmp_path: Path
) -> None:
    patient = await everything(runtime, tmp_path)
    out = tmp_path / "dental"
    report = await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=out, profile="dental")
    validate(out, dental=True)
    exported = {what for what, image in patient.images.items() if image in by_image(report.written)}
    assert exported == {"io", "io_png", "io_png_no_teeth", "pano_png", "ceph_tiff"}
    left_out = {s.image_id: s.reason for s in report.skipped}
    for what in ("cr_j2k", "sc_jpeg", "ct_volume", "io_png_no_spacing", "photo_jpeg", "document_png"):
        assert left_out[patient.images[what]].startswith("left out of the dental profile"), what
    for item in report.written:
        ds = pydicom.dcmread(out.joinpath(*item.file_id))
        assert ds.BitsStored in (8, 10, 12, 16)
        for keyword in ("InstitutionName", "DetectorID", "DetectorManufacturerName"):
            assert keyword in ds


async def test_utf8_names_make_the_whole_set_utf8(runtime: Runtime, tmp_path: Path) -> None:
    write(intraoral_object(patient_id="7", name="Łukasiewicz^Zoë", charset="ISO_IR 192"), tmp_path / "a.dcm")
    write(intraoral_object(patient_id="7", name="Łukasiewicz^Zoë", charset="ISO_IR 192"), tmp_path / "b.dcm")
    assert len((await Importer(runtime, ORIGIN).run([(str(tmp_path), "in")])).imported) == 2
    out = tmp_path / "export"
    await export_patient(runtime, ORIGIN, pms_id="7", out=out)
    files = validate(out, dental=False)
    directory = pydicom.dcmread(out / "DICOMDIR")
    assert {record.SpecificCharacterSet for record in directory.DirectoryRecordSequence} == {"ISO_IR 192"}
    assert str(directory.DirectoryRecordSequence[0].PatientName) == "Łukasiewicz^Zoë"
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "Łukasiewicz^Zoë"


async def test_refusals_write_nothing(runtime: Runtime, tmp_path: Path) -> None:
    patient = await everything(runtime, tmp_path)
    assert patient.images
    with pytest.raises(
        ExportRefused, match="originals only, as in DTX Studio Clinic: --mode filtered is refused"
    ):
        await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=tmp_path / "f", mode="filtered")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x", encoding="utf-8")
    with pytest.raises(ExportRefused, match="is not an empty folder"):
        await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=busy)
    with pytest.raises(ExportRefused, match="no patient with id '9999' from dicom"):
        await export_patient(runtime, ORIGIN, pms_id="9999", out=tmp_path / "nobody")
    assert not (tmp_path / "f").exists() and not (tmp_path / "nobody").exists()


async def test_a_missing_store_file_is_reported_and_the_rest_exported(
    runtime: Runtime, tmp_path: Path
) -> None:
    patient = await everything(runtime, tmp_path)
    image = await runtime.service.get_image(ORIGIN, patient.images["document_png"])
    assert image is not None
    runtime.files.path_for(image.sha256, image.file_ext).unlink()
    out = tmp_path / "export"
    report = await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=out)
    assert [(e.image_id, e.reason) for e in report.errors] == [
        (image.id, "the image's file is missing from the image store")
    ]
    assert len(validate(out, dental=False)) == len(patient.images) - 1


def test_the_command_refuses_filtered_mode_and_writes_a_set(tmp_path: Path, make_settings: Any) -> None:
    from tests.conftest import pms_bridge_command
    from tests.support.commands import pms_bridge

    settings = make_settings()
    made = pms_bridge("init", "--home", str(settings.path.parent))  # the commands never make a store
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(settings.path)}
    media = tmp_path / "media"
    write(intraoral_object(patient_id=PMS_ID, name=NAME), media / "a.dcm")
    imported = subprocess.run(
        [*pms_bridge_command(), "import", str(media)], capture_output=True, text=True, env=env
    )
    assert imported.returncode == 0, imported.stderr
    command = [*pms_bridge_command(), "export-dicom", "--patient", PMS_ID]
    refused = subprocess.run(
        [*command, "--out", str(tmp_path / "f"), "--mode", "filtered"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode == 2
    assert (
        "DICOM export is of originals only, as in DTX Studio Clinic: --mode filtered is refused"
        in refused.stderr
    )
    out = tmp_path / "cd"
    exported = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, env=env)
    assert exported.returncode == 0, exported.stderr
    assert (
        exported.stdout.splitlines()[0]
        == "exported  image 1 -> PT000000/ST000000/SE000000/IM000000 [original]"
    )
    assert exported.stdout.splitlines()[-1].startswith("1 images written to")
    validate(out, dental=False)
    shutil.rmtree(out)


def test_the_command_says_in_one_line_when_the_set_cannot_be_written(
    tmp_path: Path, make_settings: Any
) -> None:
    """Exit 3 with one line, no traceback; an image the disk cannot take leaves no partial file."""
    import resource

    from tests.conftest import pms_bridge_command
    from tests.support.commands import pms_bridge

    settings = make_settings()
    made = pms_bridge("init", "--home", str(settings.path.parent))  # the commands never make a store
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(settings.path)}
    write(intraoral_object(patient_id=PMS_ID, name=NAME), tmp_path / "media" / "a.dcm")
    imported = subprocess.run(
        [*pms_bridge_command(), "import", str(tmp_path / "media")], capture_output=True, text=True, env=env
    )
    assert imported.returncode == 0, imported.stderr
    command = [*pms_bridge_command(), "export-dicom", "--patient", PMS_ID]
    (tmp_path / "file").write_text("x", encoding="utf-8")
    below_a_file = subprocess.run(
        [*command, "--out", str(tmp_path / "file" / "sub")], capture_output=True, text=True, env=env
    )
    assert below_a_file.returncode == 3
    assert below_a_file.stderr == (
        f"pms-bridge export-dicom: cannot create the folder {tmp_path / 'file' / 'sub'}: Not a directory\n"
    )
    assert below_a_file.stdout == ""

    if settings.store.url.startswith("sqlite"):
        return  # SQLite cannot grow its own files under the file size limit below: this part needs PostgreSQL

    def small_files() -> None:  # writes past 4 KB fail (EFBIG), as on a full disk; the image is larger
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "full"
    full = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, env=env, preexec_fn=small_files
    )
    assert full.returncode == 2
    assert full.stderr == (
        f"pms-bridge export-dicom: nothing to export for patient {PMS_ID!r}:"
        " cannot be exported (OSError: [Errno 27] File too large)\n"
    )
    assert not out.exists(), "no partial image file and no folder of the failed export is left"


async def test_a_dicomdir_that_cannot_be_written_removes_the_set(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DICOMDIR is written last, in this process: a full disk there is simulated (the images, written
    by the pool, are real)."""
    import errno

    from bridge.dicom import export

    patient = await everything(runtime, tmp_path)

    def full_disk(path: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(export, "write_atomic", full_disk)
    out = tmp_path / "export"
    with pytest.raises(export.ExportNotWritten) as raised:
        await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=out)
    assert str(raised.value) == (
        f"the DICOMDIR cannot be written into {out} (No space left on device): the set is incomplete, and the"
        f" {len(patient.images)} image files written were removed"
    )
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(export.ExportNotWritten):
        await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=kept)
    assert kept.is_dir() and list(kept.iterdir()) == [], "a folder the user made stays, emptied"


@pytest.mark.parametrize(
    ("last", "first", "family", "given"),
    [
        ("L" * 70, "Anna", "L" * 59, "Anna"),  # the store holds 120 characters, a PN group 64
        ("Back\\Slash", "Care^t", "Back Slash", "Care t"),  # VM and component delimiters
        ("Eq=uals", "Ann", "Eq uals", "Ann"),  # the component group delimiter
        ("Ł" * 40, "Zoë", "Ł" * 29, "Zoë"),  # UTF-8: 64 bytes, cut between characters
    ],
)
async def test_patient_names_follow_the_pn_rules_whatever_the_store_holds(
    runtime: Runtime, tmp_path: Path, last: str, first: str, family: str, given: str
) -> None:
    from bridge.model import Action, Demographics, PatientRequest
    from bridge.model import Origin as PmsOrigin

    opened = await runtime.service.handle(
        PatientRequest(
            Action.OPEN,
            PmsOrigin("vdds", "cli", "DESK"),
            "dicom",
            "77",
            demographics=Demographics(last, first),
        )
    )
    assert opened.patient is not None and opened.patient.last_name == last, opened.message
    write(intraoral_object(patient_id="77", name=""), tmp_path / "media" / "a.dcm")
    imported = await Importer(runtime, ORIGIN).run([(str(tmp_path / "media"), "media")])
    assert len(imported.imported) == 1, imported.errors
    out = tmp_path / "export"
    await export_patient(runtime, ORIGIN, pms_id="77", out=out)
    files = validate(out, dental=False)  # dciodvfy: no Error line on any file or the DICOMDIR
    directory = pydicom.dcmread(out / "DICOMDIR")
    names = [
        directory.DirectoryRecordSequence[0].PatientName,
        *(pydicom.dcmread(f).PatientName for f in files),
    ]
    for name in names:
        assert (name.family_name, name.given_name, name.middle_name) == (family, given, "")
        assert name.ideographic == "" and name.phonetic == ""


async def test_a_quarter_turned_exif_file_exports_its_spacing_turned_too(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A TIFF X-ray whose EXIF orientation (6) turns it a quarter, with 1270 dpi across and 635 down as the
    file lies: stored and exported upright, its rows are the file's columns, so the row spacing is
    25.4/1270 mm and the column spacing 25.4/635 mm (DICOM's order: row, then column)."""
    from PIL import Image

    from bridge.model import Category
    from tests.support import synthetic

    pixels = synthetic.intraoral(320, 240, bits=12)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "TIFF", dpi=(1270, 635), exif=exif)
    opened = await everything(runtime, tmp_path)
    (added,) = await runtime.imaging.ingest_all(
        runtime.service,
        ORIGIN,
        opened.patient_id,
        [("turned.tif", out.getvalue())],
        category=Category.INTRAORAL_XRAY,
    )
    export = tmp_path / "export"
    report = await export_patient(runtime, ORIGIN, pms_id=PMS_ID, out=export)
    exported = pydicom.dcmread(export.joinpath(*by_image(report.written)[added.id].file_id))
    assert (exported.Rows, exported.Columns) == (pixels.shape[1], pixels.shape[0])
    assert [float(v) for v in exported.ImagerPixelSpacing] == [0.02, 0.04]
