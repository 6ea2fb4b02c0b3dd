"""DICOM import on SQLite and PostgreSQL: sample files, reference DICOMDIRs, CT volumes, bad input, identity.

Pixel identity is checked against pydicom's own decode of the source file; the stored file must be the
source byte for byte. Real files, a real store and the real process pool; no mocks.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from bridge.dicom import volume
from bridge.dicom.importer import FILES_PER_TASK, Importer, ImportReport, task_bounds
from bridge.dicom.wrap import decoded_pixels
from bridge.imaging import analyze
from bridge.model import Action, Demographics, NewImage, Origin, PatientRequest, Sex
from bridge.runtime import Runtime
from bridge.store.files import STAGING, FileStore
from bridge.store.models import Image, Patient, PmsLink
from tests.support.dicomfiles import dental_dataset, intraoral_object, sample, sensor_xrays, to_bytes, write

ORIGIN = Origin("dicom", "import", "TEST")

# pydicom's shipped files and pydicom-data's: CR radiographs uncompressed, J2K lossless and lossy; JPEG
# lossless grey and colour; RLE; JPEG baseline colour (RGB and YBR 4:2:2), JPEG extended 12-bit; a signed
# CT slice. Some are one object in several encodings under one SOP Instance UID, which a store holds once:
# each round goes to a fresh store.
SAMPLE_ROUNDS = {
    "uncompressed-and-lossless": [
        "RG1_UNCI.dcm",
        "RG1_UNCR.dcm",
        "RG1_J2KR.dcm",
        "RG3_UNCI.dcm",
        "RG3_UNCR.dcm",
        "RG3_J2KR.dcm",
        "JPEG-LL.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "JPGExtended.dcm",
        "CT_small.dcm",
    ],
    "j2k-lossy-and-rle": ["RG1_J2KI.dcm", "RG3_J2KI.dcm", "SC_rgb_rle.dcm"],
    "rle-16-bit-colour": ["SC_rgb_rle_16bit.dcm"],
}
DICOMDIR_VARIANTS = [
    "DICOMDIR",
    "DICOMDIR-implicit",
    "DICOMDIR-nooffset",
    "DICOMDIR-reordered",
    "DICOMDIR-bigEnd",
    "DICOMDIR-nopatient",
]
REFERENCE_SET = sample("CT_small.dcm").parent / "dicomdirtests"


async def run_import(rt: Runtime, *paths: Path, display: str = "") -> ImportReport:
    sources = [(str(p), f"{display}{p.name}" if display else str(p)) for p in paths]
    return await Importer(rt, ORIGIN).run(sources)


def pydicom_pixels(path: Path | bytes) -> np.ndarray[Any, Any]:
    ds = pydicom.dcmread(io.BytesIO(path) if isinstance(path, bytes) else path)
    return np.asarray(ds.pixel_array)


def bridge_pixels(data: bytes) -> tuple[np.ndarray[Any, Any], analyze.Decoded]:
    """What the bridge decodes from a stored file (first frame), with signed values restored."""
    decoded = analyze.decode(data)
    return decoded_pixels(decoded), decoded


def stored_files(rt: Runtime) -> set[str]:
    """The content hashes of every file in the image store (thumbnail cache left out)."""
    root = rt.settings.store.images
    return {
        path.stem
        for path in root.rglob("*")
        if path.is_file() and "thumbnails" not in path.relative_to(root).parts
    }


def image_rows(rt: Runtime) -> list[Image]:
    return rt.db.read_sync(lambda s: list(s.scalars(select(Image).order_by(Image.id))))


# --------------------------------------------------------------------------------------------------
# Sample files and the reference DICOMDIRs


@pytest.mark.parametrize("round_name", SAMPLE_ROUNDS)
async def test_sample_files_are_stored_byte_for_byte_with_pydicoms_pixels(
    runtime: Runtime, round_name: str
) -> None:
    paths = [sample(name) for name in SAMPLE_ROUNDS[round_name]]
    report = await run_import(runtime, *paths)
    assert report.errors == [] and report.skipped == []
    by_path = {item.path: item for item in report.imported}
    assert len(by_path) == len(paths)
    for path in paths:
        item = by_path[str(path)]
        image = await runtime.service.get_image(ORIGIN, item.image_id)
        assert image is not None
        stored = runtime.files.path_for(image.sha256, image.file_ext).read_bytes()
        source = path.read_bytes()
        if path.name == "CT_small.dcm":  # a CT slice becomes a volume of one frame
            assert image.frames == 1 and image.category.value == "cbct"
            assert np.array_equal(pydicom_pixels(stored), pydicom_pixels(path))
            assert np.array_equal(bridge_pixels(stored)[0], pydicom_pixels(path))
            continue
        assert stored == source, f"{path.name} was not stored byte for byte"
        expected = pydicom_pixels(path)
        ours, decoded = bridge_pixels(stored)
        assert (image.width, image.height) == (expected.shape[1], expected.shape[0]), path.name
        if expected.ndim == 3 and expected.dtype != np.uint8:  # 16-bit colour is shown in 8 bits
            expected = expected >> (int(pydicom.dcmread(path).BitsStored) - 8)
        assert decoded.color == (expected.ndim == 3), path.name
        assert np.array_equal(ours, expected), f"{path.name}: pixels differ from pydicom's decode"


@pytest.mark.parametrize("variant", DICOMDIR_VARIANTS)
def test_every_reference_dicomdir_variant_lists_the_same_files(variant: str) -> None:
    from bridge.dicom.fileset import discover

    found = discover([(str(REFERENCE_SET / variant), variant)])
    assert found.errors == [] and found.skipped == []
    listed = sorted(Path(c.path).relative_to(REFERENCE_SET).as_posix() for c in found.candidates)
    assert len(listed) == 31
    reference = discover([(str(REFERENCE_SET / "DICOMDIR"), "DICOMDIR")])
    assert listed == sorted(Path(c.path).relative_to(REFERENCE_SET).as_posix() for c in reference.candidates)


def test_an_empty_dicomdir_is_reported_as_listing_nothing() -> None:
    from bridge.dicom.fileset import discover

    found = discover([(str(REFERENCE_SET / "DICOMDIR-empty.dcm"), "empty")])
    assert found.candidates == []
    assert [(p.path, p.reason) for p in found.skipped] == [("empty", "the DICOMDIR lists no files")]


async def test_a_reference_file_set_imports_cr_images_and_ct_volumes_and_refuses_mr(runtime: Runtime) -> None:
    report = await run_import(runtime, REFERENCE_SET / "DICOMDIR-reordered")
    kinds = sorted((item.category, item.files) for item in report.imported)
    # three CR images, a 4-slice and a 5-slice CT volume, and a series of two slices of different
    # orientation (not one volume), imported slice by slice with a note saying so
    assert kinds == [("cbct", 1), ("cbct", 1), ("cbct", 4), ("cbct", 5)] + [("extraoral-xray", 1)] * 3
    assert len(report.notes) == 1 and "imported one by one" in report.notes[0].reason
    assert len(report.errors) == 17
    assert all(
        "98892003" in p.path and "unsupported SOP class MR Image Storage" in p.reason for p in report.errors
    )
    volume_item = next(item for item in report.imported if item.files == 5)
    image = await runtime.service.get_image(ORIGIN, volume_item.image_id)
    assert image is not None and image.frames == 5
    patients = await runtime.service.search_patients(ORIGIN, pms_id="98890234", pms_system="dicom")
    assert [(p.last_name, p.first_name) for p in patients] == [("Doe", "Peter")]
    again = await run_import(runtime, REFERENCE_SET / "DICOMDIR")
    assert again.imported == []
    assert {p.reason for p in again.skipped} == {"already imported"} and len(again.skipped) == 14


def test_a_ct_volume_is_valid_stacked_in_position_order_and_the_same_every_time(tmp_path: Path) -> None:
    slices = sorted((REFERENCE_SET / "98892001" / "CT5N").iterdir())
    data = volume.build_volume([(str(p), p.name) for p in slices])
    assert volume.build_volume([(str(p), p.name) for p in reversed(slices)]) == data
    path = tmp_path / "volume.dcm"
    path.write_bytes(data)
    verdict = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
    assert verdict.splitlines()[0] == "LegacyConvertedEnhancedCTImage"
    assert [line for line in verdict.splitlines() if line.startswith("Error")] == []
    stacked = pydicom_pixels(data)
    sources = sorted((pydicom.dcmread(p) for p in slices), key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert stacked.shape == (5, 16, 16)
    for frame, source in zip(stacked, sources, strict=True):
        assert np.array_equal(frame, source.pixel_array)
    ds = pydicom.dcmread(path)
    assert ds.SeriesInstanceUID == sources[0].SeriesInstanceUID
    references = [
        f.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert references == [s.SOPInstanceUID for s in sources]
    positions = [
        list(map(float, f.PlanePositionSequence[0].ImagePositionPatient))
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert positions == [list(map(float, s.ImagePositionPatient)) for s in sources]


# --------------------------------------------------------------------------------------------------
# Bad input


async def test_bad_files_are_reported_one_by_one_and_nothing_is_half_imported(
    runtime: Runtime, tmp_path: Path
) -> None:
    good = write(dental_dataset(patient_id="7"), tmp_path / "in" / "good.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not an image", encoding="utf-8")
    source = to_bytes(dental_dataset(patient_id="7"))
    (tmp_path / "in" / "cut_header.dcm").write_bytes(source[:200])
    (tmp_path / "in" / "cut_pixels.dcm").write_bytes(source[:-500])
    shutil.copy(sample("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "in" / "jpegls.dcm")
    j2k = sample("RG3_J2KR.dcm").read_bytes()
    (tmp_path / "in" / "cut_j2k.dcm").write_bytes(j2k[:-5000])
    # the same length, the codestream's header (SOC and SIZ markers) zeroed: only decoding finds it
    start = j2k.index(b"\xff\x4f\xff\x51")
    (tmp_path / "in" / "bad_j2k.dcm").write_bytes(j2k[:start] + bytes(64) + j2k[start + 64 :])
    fileset = tmp_path / "media"
    shutil.copytree(REFERENCE_SET, fileset, ignore=shutil.ignore_patterns("TINY_ALPHA", "98892003"))
    (fileset / "77654033" / "CR3" / "6278").unlink()  # listed in the DICOMDIR, gone from the media
    damaged = fileset / "98892001" / "CT5N" / "2392"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # one damaged slice: its series is not imported
    report = await run_import(runtime, tmp_path / "in", fileset)
    reasons = {Path(p.path).name: p.reason for p in report.errors}
    assert reasons["notes.txt"] == "not a DICOM file (no DICM marker after the 128-byte preamble)"
    assert reasons["cut_header.dcm"] == "truncated DICOM file: it ends inside its meta information"
    assert reasons["cut_pixels.dcm"] == "truncated DICOM file: it ends inside PixelData (7FE0,0010)"
    assert reasons["cut_j2k.dcm"] == "truncated DICOM file: its pixel data ends early"
    assert reasons["bad_j2k.dcm"].startswith("corrupt or truncated DICOM pixel data (JPEG 2000")
    assert reasons["jpegls.dcm"].startswith("unsupported transfer syntax JPEG-LS Lossless")
    assert reasons["6278"] == "listed in the DICOMDIR but missing from the file set"
    assert reasons["2392"] == "truncated DICOM file: it ends inside PixelData (7FE0,0010)"
    for other in ("2062", "2693", "3023", "3353"):
        assert reasons[other] == f"not imported: a slice of its CT series is damaged ({damaged})"
    not_copied = [p for p in report.errors if "98892003" in p.path]
    assert len(not_copied) == 17
    assert {p.reason for p in not_copied} == {"listed in the DICOMDIR but missing from the file set"}
    imported = {Path(item.path).name for item in report.imported}
    assert imported == {"good.dcm", "6154", "6247", "17106", "6293", "6924"}
    assert str(good) in {item.path for item in report.imported}
    rows = image_rows(runtime)
    assert len(rows) == len(report.imported)
    assert stored_files(runtime) == {row.sha256 for row in rows}, "a refused file left bytes in the store"


async def test_native_pixel_data_one_pixel_short_is_refused_and_leaves_nothing(
    runtime: Runtime, tmp_path: Path
) -> None:
    ds = dental_dataset(patient_id="8")
    ds.PixelData = ds.PixelData[:-2]  # a complete file whose pixel data is one 16-bit pixel short
    report = await run_import(runtime, write(ds, tmp_path / "short.dcm"))
    assert [p.reason for p in report.errors] == [
        "corrupt or truncated DICOM pixel data: 6142 bytes where Rows, Columns, Number of Frames and"
        " Bits Allocated declare 6144"
    ]
    assert image_rows(runtime) == [] and stored_files(runtime) == set()


@pytest.mark.parametrize("patient", ["known", "new"])
async def test_files_are_flushed_before_their_rows_and_a_failed_batch_leaves_no_file(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patient: str
) -> None:
    """A known patient's images are added by `add_images`, a new one's by `import_images` (which creates
    the patient with them): either way the files are on disk before the transaction."""
    if patient == "known":
        request = PatientRequest(
            Action.CREATE_OR_UPDATE, ORIGIN, "dicom", "9", demographics=Demographics("Doe")
        )
        assert (await runtime.service.handle(request)).patient is not None
    paths = [
        write(dental_dataset(patient_id="9", pixels=np.full((8, 8), n, np.uint16)), tmp_path / f"{n}.dcm")
        for n in range(3)
    ]
    files = runtime.files
    synced: list[Path] = []
    called: list[str] = []

    def sync_folder(folder: Path) -> None:
        synced.append(folder)
        FileStore.sync_folder(folder)

    def refuse(method: str, new: list[NewImage]) -> NoReturn:
        called.append(method)
        for image in new:  # on disk, under its name, in folders flushed since
            path = files.path_for(image.sha256, image.file_ext)
            assert path.is_file() and {path.parent, path.parent.parent, files.root} <= set(synced)
        raise OperationalError("INSERT INTO images", {}, Exception("disk I/O error"))

    async def add_images(origin: Origin, patient_id: int, new: list[NewImage]) -> list[Any]:
        refuse("add_images", new)

    async def import_images(req: PatientRequest, new: list[NewImage]) -> tuple[Any, list[Any]]:
        refuse("import_images", new)

    monkeypatch.setattr(files, "sync_folder", sync_folder)
    monkeypatch.setattr(runtime.service, "add_images", add_images)
    monkeypatch.setattr(runtime.service, "import_images", import_images)
    with pytest.raises(OperationalError):
        await run_import(runtime, *paths)
    assert called == ["add_images" if patient == "known" else "import_images"]
    left = [p for p in files.root.rglob("*") if p.is_file() and "thumbnails" not in p.parts]
    assert left == [], "the files of a batch the database refused (or their temporary files) remain"


async def test_a_file_the_store_cannot_take_is_reported_and_the_import_goes_on(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The pool workers write into the store's staging folder; when that fails (here: a file where the
    folder must be) each file says why, no row is added, and the import still answers."""
    paths = [write(dental_dataset(patient_id="10"), tmp_path / f"{n}.dcm") for n in range(2)]
    root = runtime.settings.store.images
    root.mkdir(parents=True, exist_ok=True)
    (root / STAGING).write_bytes(b"")
    report = await run_import(runtime, *paths)
    assert sorted((Path(p.path).name, p.reason) for p in report.errors) == [
        ("0.dcm", "cannot be stored: File exists"),
        ("1.dcm", "cannot be stored: File exists"),
    ]
    assert report.imported == [] and image_rows(runtime) == []
    (root / STAGING).unlink()
    again = await run_import(runtime, *paths)
    assert len(again.imported) == 2 and stored_files(runtime) == {row.sha256 for row in image_rows(runtime)}


async def test_dicomdir_paths_must_stay_inside_the_file_set(runtime: Runtime, tmp_path: Path) -> None:
    fileset = tmp_path / "media"
    shutil.copytree(REFERENCE_SET / "77654033", fileset / "77654033")
    write(dental_dataset(patient_id="77654033", name="Doe^Archibald"), tmp_path / "outside.dcm")
    (fileset / "LINK").symlink_to(tmp_path / "outside.dcm")
    directory = pydicom.dcmread(REFERENCE_SET / "DICOMDIR")
    images = [r for r in directory.DirectoryRecordSequence if "ReferencedFileID" in r]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid File ID this test writes on purpose
        images[0].ReferencedFileID = ["..", "outside.dcm"]
        images[1].ReferencedFileID = "LINK"
        directory.save_as(fileset / "DICOMDIR")
    report = await run_import(runtime, fileset)
    refused = {p.path: p.reason for p in report.errors}
    assert (
        refused[f"{fileset}/../outside.dcm"] == "the DICOMDIR refers to a path outside its file set: refused"
    )
    assert refused[f"{fileset}/LINK"] == "the DICOMDIR refers to a file outside its file set: refused"
    # the rest of patient 77654033 imports; the other patients' files were not copied
    assert {item.path for item in report.imported} == {
        f"{fileset}/77654033/CR3/6278",
        f"{fileset}/77654033/CT2/17106",
    }
    others = [p for p in report.errors if "outside" not in p.reason]
    assert others and all(
        "9889" in p.path and p.reason.startswith("listed in the DICOMDIR but missing") for p in others
    )


async def test_files_above_the_size_limit_are_refused(make_settings: Any, tmp_path: Path) -> None:
    rt = Runtime.build(make_settings(dicom={"max_file_mb": 1}))
    try:
        pixels = np.zeros((800, 800), np.uint16)
        big = write(dental_dataset(pixels=pixels), tmp_path / "big.dcm")
        report = await run_import(rt, big)
        assert [p.reason for p in report.errors] == ["too large: 1.2 MB (limit 1 MB, [dicom] max_file_mb)"]
    finally:
        await rt.audit.flush()
        rt.close()


# --------------------------------------------------------------------------------------------------
# Identity


async def test_imports_follow_the_identity_rules_and_never_rewrite_the_pms_data(
    make_settings: Any, tmp_path: Path
) -> None:
    rt = Runtime.build(make_settings(dicom={"pms_system": "PVS1"}, pms={"allow_patient_creation": "no"}))
    try:
        known = await rt.service.handle(
            PatientRequest(
                Action.OPEN,
                Origin("vdds", "cli", "DESK"),
                "PVS1",
                "0042",
                demographics=Demographics("Doe", "Jane", birth_date=None, sex=Sex.FEMALE),
            )
        )
        assert known.patient is not None
        same = write(
            dental_dataset(patient_id="0042", name="Doe^Janet", birth_date="19800506"), tmp_path / "a.dcm"
        )
        other_birth = write(dental_dataset(patient_id="0042", name="Doe^Jane", sex="M"), tmp_path / "b.dcm")
        unknown = write(dental_dataset(patient_id="0099", name="New^Person"), tmp_path / "c.dcm")
        report = await run_import(rt, same, other_birth, unknown)
        assert [(Path(i.path).name, i.patient_id) for i in report.imported] == [("a.dcm", known.patient.id)]
        reasons = {Path(p.path).name: p.reason for p in report.errors}
        assert "known with other data: sex F in the store, M sent" in reasons["b.dcm"]
        assert "patient creation is disabled (allow_patient_creation = no)" in reasons["c.dcm"]
        patient = await rt.service.get_patient(ORIGIN, known.patient.id)
        assert patient is not None
        assert (patient.first_name, patient.birth_date) == ("Jane", None), "an import rewrote the PMS's data"
        links = rt.db.read_sync(lambda s: [(k.pms_system, k.protocol) for k in s.scalars(select(PmsLink))])
        assert links == [("PVS1", "vdds")], "an import took over the link that decides the PMS's pushes"
        conflicts = await rt.service.list_conflicts(ORIGIN)
        assert [c["kind"] for c in conflicts] == ["demographics"]
        assert (await rt.service.search_patients(ORIGIN, pms_id="0099")) == []
    finally:
        await rt.audit.flush()
        rt.close()


async def test_an_import_without_practice_id_joins_the_patient_its_pms_launched_with_one(
    make_settings: Any, tmp_path: Path
) -> None:
    """`[dicom] practice_id =` is empty (as init writes it); the VDDS patient came with PRXNR=1. The file's
    image goes to that patient, not to a second patient keyed to no practice."""
    rt = Runtime.build(make_settings(dicom={"pms_system": "PVS1", "practice_id": ""}))
    try:
        known = await rt.service.handle(
            PatientRequest(
                Action.OPEN,
                Origin("vdds", "cli", "DESK"),
                "PVS1",
                "PX1",
                practice_id="1",
                demographics=Demographics("Doe", "Jane", sex=Sex.FEMALE),
            )
        )
        assert known.patient is not None
        report = await run_import(rt, write(dental_dataset(patient_id="PX1"), tmp_path / "a.dcm"))
        assert [i.patient_id for i in report.imported] == [known.patient.id], report.errors
        assert [p.id for p in await rt.service.search_patients(ORIGIN)] == [known.patient.id]
    finally:
        await rt.audit.flush()
        rt.close()


async def test_a_new_patient_is_created_from_the_file_under_the_configured_system_and_tag(
    make_settings: Any, tmp_path: Path
) -> None:
    rt = Runtime.build(make_settings(dicom={"pms_system": "dentrix", "patient_id_tag": "OtherPatientIDs"}))
    try:
        path = write(
            dental_dataset(
                patient_id="HOSP-1", OtherPatientIDs=["000123", "X"], name="Müller^Hans^Peter^Dr."
            ),
            tmp_path / "a.dcm",
        )
        report = await run_import(rt, path)
        assert report.errors == []
        (patient,) = await rt.service.search_patients(ORIGIN, pms_system="dentrix", pms_id="000123")
        assert (patient.last_name, patient.first_name, patient.middle_name, patient.title) == (
            "Müller",
            "Hans",
            "Peter",
            "Dr.",
        )
        assert str(patient.birth_date) == "1980-05-06" and patient.sex.value == "F"
        missing = write(dental_dataset(patient_id="HOSP-2"), tmp_path / "b.dcm")
        (problem,) = (await run_import(rt, missing)).errors
        assert problem.reason == (
            "no patient id in OtherPatientIDs (0010,1000), the attribute [dicom] patient_id_tag names"
        )
    finally:
        await rt.audit.flush()
        rt.close()


async def test_a_stored_uid_with_other_bytes_or_another_patient_is_refused(
    runtime: Runtime, tmp_path: Path
) -> None:
    ds = dental_dataset(patient_id="1")
    first = write(ds, tmp_path / "first.dcm")
    assert len((await run_import(runtime, first)).imported) == 1
    ds.InstitutionName = "Changed"
    changed = write(ds, tmp_path / "changed.dcm")
    ds.PatientID = "2"
    del ds.InstitutionName
    moved = write(ds, tmp_path / "moved.dcm")
    report = await run_import(runtime, changed, moved)
    reasons = {Path(p.path).name: p.reason for p in report.errors}
    uid = ds.SOPInstanceUID
    assert reasons == {
        "changed.dcm": f"SOP Instance UID {uid} is already stored with other content",
        "moved.dcm": f"SOP Instance UID {uid} is already stored for another patient",
    }


def patients_by_pms_id(rt: Runtime) -> dict[str, int]:
    """Every stored patient by the PMS id of its link, read from the database itself."""
    return rt.db.read_sync(
        lambda s: (
            {link.pms_id: link.patient_id for link in s.scalars(select(PmsLink))}
            | {f"unlinked {p.id}": p.id for p in s.scalars(select(Patient)) if not p.links}
        )
    )


async def created_patients(rt: Runtime) -> int:
    """How many `patient.create` entries the audit log holds."""
    await rt.audit.flush()
    entries = await rt.service.audit_entries(ORIGIN, limit=1000)
    return sum(entry["action"] == "patient.create" for entry in entries)


async def test_a_new_patient_none_of_whose_files_is_added_is_not_created(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Nothing half-imported remains: the patient of a file the store refuses is created in the transaction
    that adds its first image, so a new PMS id none of whose files is added leaves no (empty) patient.
    NEW9's file carries the SOP Instance UID of P1's image (refused before any insert), NEW8's the study
    of P1 (refused by the insert: the batch, then the file on its own, rolled back)."""
    first = dental_dataset(patient_id="P1")
    assert len((await run_import(runtime, write(first, tmp_path / "first.dcm"))).imported) == 1
    same_uid = dental_dataset(patient_id="NEW9")
    same_uid.SOPInstanceUID = first.SOPInstanceUID
    same_study = dental_dataset(patient_id="NEW8", study_uid=first.StudyInstanceUID)
    report = await run_import(
        runtime, write(same_uid, tmp_path / "uid.dcm"), write(same_study, tmp_path / "study.dcm")
    )
    assert report.imported == []
    assert {Path(p.path).name: p.reason for p in report.errors} == {
        "uid.dcm": f"SOP Instance UID {first.SOPInstanceUID} is already stored for another patient",
        "study.dcm": f"study {first.StudyInstanceUID} belongs to another patient",
    }
    assert list(patients_by_pms_id(runtime)) == ["P1"], "a refused import left a patient behind"
    assert await runtime.service.search_patients(ORIGIN, pms_id="NEW9") == []
    assert await created_patients(runtime) == 1
    assert len(image_rows(runtime)) == 1


async def test_a_new_patient_is_created_once_with_all_its_images(runtime: Runtime, tmp_path: Path) -> None:
    paths = [
        write(dental_dataset(patient_id="NEW1", pixels=np.full((8, 8), n, np.uint16)), tmp_path / f"{n}.dcm")
        for n in range(3)
    ]
    report = await run_import(runtime, *paths)
    assert report.errors == [] and len(report.imported) == 3
    patients = patients_by_pms_id(runtime)
    assert list(patients) == ["NEW1"]
    assert {item.patient_id for item in report.imported} == {patients["NEW1"]}
    assert {row.patient_id for row in image_rows(runtime)} == {patients["NEW1"]}
    assert await created_patients(runtime) == 1
    again = await run_import(runtime, write(dental_dataset(patient_id="NEW1"), tmp_path / "later.dcm"))
    assert [item.patient_id for item in again.imported] == [patients["NEW1"]], "a known patient is found"
    assert await created_patients(runtime) == 1


@pytest.mark.parametrize("refused_by", ["sop-instance-uid", "study"])
async def test_a_new_patients_refused_file_beside_a_fresh_one_gives_it_one_image(
    runtime: Runtime, tmp_path: Path, refused_by: str
) -> None:
    """One file of NEW5 is refused (its SOP Instance UID, or its study, is P1's), the other is fresh: NEW5
    is created with the fresh file's image. A refused study fails the whole batch's insert, so each file
    is then added on its own: the refused one's rolled-back creation must not be taken for the patient."""
    first = dental_dataset(patient_id="P1")
    assert len((await run_import(runtime, write(first, tmp_path / "first.dcm"))).imported) == 1
    if refused_by == "study":
        refused = dental_dataset(patient_id="NEW5", study_uid=first.StudyInstanceUID)
    else:
        refused = dental_dataset(patient_id="NEW5")
        refused.SOPInstanceUID = first.SOPInstanceUID
    fresh = dental_dataset(patient_id="NEW5", pixels=np.full((8, 8), 3, np.uint16))
    report = await run_import(
        runtime, write(refused, tmp_path / "refused.dcm"), write(fresh, tmp_path / "fresh.dcm")
    )
    assert [Path(p.path).name for p in report.errors] == ["refused.dcm"]
    patients = patients_by_pms_id(runtime)
    assert sorted(patients) == ["NEW5", "P1"]
    assert [(Path(i.path).name, i.patient_id) for i in report.imported] == [("fresh.dcm", patients["NEW5"])]
    assert sorted(row.patient_id for row in image_rows(runtime)) == sorted(patients.values())
    assert await created_patients(runtime) == 2


async def test_a_new_patient_whose_first_batch_fails_is_created_by_its_later_volume(
    runtime: Runtime, tmp_path: Path
) -> None:
    """In one import, NEW6's intra-oral file is refused (its study is P1's) and its CT slice is added
    later, as a volume: the patient is created then, with the volume, and only once."""
    first = dental_dataset(patient_id="P1")
    assert len((await run_import(runtime, write(first, tmp_path / "first.dcm"))).imported) == 1
    refused = dental_dataset(patient_id="NEW6", name="Doe^Jane", study_uid=first.StudyInstanceUID)
    ct = pydicom.dcmread(sample("CT_small.dcm"))
    ct.PatientID, ct.PatientName, ct.PatientBirthDate, ct.PatientSex = "NEW6", "Doe^Jane", "19800506", "F"
    report = await run_import(
        runtime, write(refused, tmp_path / "refused.dcm"), write(ct, tmp_path / "ct.dcm")
    )
    assert [Path(p.path).name for p in report.errors] == ["refused.dcm"]
    patients = patients_by_pms_id(runtime)
    assert sorted(patients) == ["NEW6", "P1"]
    assert [(Path(i.path).name, i.category) for i in report.imported] == [("ct.dcm", "cbct")]
    assert report.imported[0].patient_id == patients["NEW6"]
    assert await created_patients(runtime) == 2


async def test_a_new_patient_whose_files_cannot_be_flushed_is_not_created(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folders holding a file's name are flushed before its batch's transaction: when that fails, the
    file is reported, removed again (it was renamed into place already), and its new patient is not
    created (its creation is part of that transaction)."""
    path = write(dental_dataset(patient_id="NEW7"), tmp_path / "a.dcm")

    def sync_folder(folder: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(folder))

    monkeypatch.setattr(runtime.files, "sync_folder", sync_folder)
    report = await run_import(runtime, path)
    assert [p.reason for p in report.errors] == [f"cannot be stored: {os.strerror(errno.EIO)}"]
    assert patients_by_pms_id(runtime) == {} and await created_patients(runtime) == 0
    assert [p for p in runtime.files.root.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    again = await run_import(runtime, path)
    assert len(again.imported) == 1 and list(patients_by_pms_id(runtime)) == ["NEW7"]


async def test_one_new_patient_spelled_two_ways_in_one_import_is_one_patient(
    runtime: Runtime, tmp_path: Path
) -> None:
    """NEW4's files name it 'Doe^Jane' and 'DOE^JANE' (the same patient, looked up apart) and carry one SOP
    Instance UID. Whichever is added first creates NEW4; the other's instance is then NEW4's own, stored
    with other content, not another patient's (the still-new patient is looked up again first)."""
    first = dental_dataset(patient_id="NEW4", name="Doe^Jane")
    second = dental_dataset(patient_id="NEW4", name="DOE^JANE")
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    report = await run_import(runtime, write(first, tmp_path / "a.dcm"), write(second, tmp_path / "b.dcm"))
    assert len(report.imported) == 1
    assert [p.reason for p in report.errors] == [
        f"SOP Instance UID {first.SOPInstanceUID} is already stored with other content"
    ]
    assert list(patients_by_pms_id(runtime)) == ["NEW4"] and await created_patients(runtime) == 1


async def test_two_imports_of_one_new_patient_at_once_create_it_once(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Imports started at once for one new PMS id (two uploads, two workstations) make one patient with
    every image: the unique key on the link decides, and the loser's images go to the winner's patient."""
    for round_ in range(4):
        pms_id = f"RACE{round_}"
        paths = [
            write(
                dental_dataset(patient_id=pms_id, pixels=np.full((8, 8), n, np.uint16)),
                tmp_path / f"{round_}-{n}.dcm",
            )
            for n in range(4)
        ]
        reports = await asyncio.gather(*(run_import(runtime, path) for path in paths))
        assert [len(r.imported) for r in reports] == [1] * 4, [r.errors for r in reports]
        patient_id = patients_by_pms_id(runtime)[pms_id]
        assert {r.imported[0].patient_id for r in reports} == {patient_id}
        assert await created_patients(runtime) == round_ + 1


async def test_the_same_file_twice_in_one_import_is_stored_once(runtime: Runtime, tmp_path: Path) -> None:
    data = to_bytes(dental_dataset())
    paths = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.dcm").write_bytes(data)
        paths.append(tmp_path / name / "x.dcm")
    report = await run_import(runtime, *paths)
    assert len(report.imported) == 1 and [p.reason for p in report.skipped] == ["already imported"] * 2
    assert len(image_rows(runtime)) == 1


async def test_one_file_reached_three_ways_is_read_once(runtime: Runtime, tmp_path: Path) -> None:
    """A file in a walked folder, the same file named on its own, and a link to it in another folder (a
    walked folder's plain files are keyed by the folder's resolved path, the rest resolved one by one):
    one file, read once, nothing reported."""
    folder = tmp_path / "set"
    folder.mkdir()
    path = write(dental_dataset(), folder / "a.dcm")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "to-a.dcm").symlink_to(path)
    report = await run_import(runtime, folder, path, tmp_path / "links", tmp_path / "set" / ".." / "set")
    assert len(report.imported) == 1 and report.skipped == [] and report.errors == []
    assert len(image_rows(runtime)) == 1


async def test_imported_thumbnails_render_on_first_request(runtime: Runtime, tmp_path: Path) -> None:
    report = await run_import(runtime, write(dental_dataset(), tmp_path / "a.dcm"))
    image = await runtime.service.get_image(ORIGIN, report.imported[0].image_id)
    assert image is not None
    thumbnail = runtime.imaging.thumbnail_path(image, runtime.settings.thumbnails.size)
    assert not thumbnail.exists(), "[dicom] render_at_import = no renders nothing while importing"
    assert (await runtime.imaging.thumbnail(image)).read_bytes()[:3] == b"\xff\xd8\xff"


# --------------------------------------------------------------------------------------------------
# The command


def test_the_import_command_prints_every_file_and_exits_1_on_problems(
    tmp_path: Path, make_settings: Any
) -> None:
    from tests.conftest import pms_bridge_command
    from tests.support.commands import pms_bridge

    settings = make_settings()
    made = pms_bridge("init", "--home", str(settings.path.parent))  # the commands never make a store
    assert made.returncode == 0, made.stderr
    good = write(dental_dataset(patient_id="5"), tmp_path / "good.dcm")
    (tmp_path / "bad.txt").write_text("x", encoding="utf-8")
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(settings.path)}
    first = subprocess.run(
        [*pms_bridge_command(), "import", str(good), str(tmp_path / "bad.txt")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert first.returncode == 1, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"imported  {good} -> image 1 (patient 5, intraoral-xray)")
    assert (
        lines[1]
        == f"error     {tmp_path / 'bad.txt'}: not a DICOM file (no DICM marker after the 128-byte preamble)"
    )
    assert lines[-1] == "1 images imported from 1 files; 0 skipped; 1 not imported"
    again = subprocess.run(
        [*pms_bridge_command(), "import", "--json", str(good)], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0, again.stderr
    body = json.loads(again.stdout)
    assert body["skipped"] == [{"path": str(good), "reason": "already imported"}]
    assert body["summary"] == {"images": 0, "files": 0, "skipped": 1, "errors": 0}


def test_the_import_command_refuses_a_file_whose_birth_date_is_in_the_future(
    tmp_path: Path, make_settings: Any
) -> None:
    """A PatientBirthDate after the daemon's date (plus the day of slack) is a typo, refused by the
    service as for every protocol: the file is reported with the date, and neither its patient nor its
    image is stored (a later PMS launch with the right date would otherwise be a conflict)."""
    from tests.conftest import pms_bridge_command
    from tests.support.commands import pms_bridge

    settings = make_settings()
    made = pms_bridge("init", "--home", str(settings.path.parent))
    assert made.returncode == 0, made.stderr
    future = write(dental_dataset(patient_id="77", birth_date="20991231"), tmp_path / "future.dcm")
    good = write(dental_dataset(patient_id="78"), tmp_path / "good.dcm")
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(settings.path)}
    done = subprocess.run(
        [*pms_bridge_command(), "import", "--json", str(future), str(good)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    body = json.loads(done.stdout)
    assert body["errors"] == [
        {"path": str(future), "reason": "patient '77': birth date '2099-12-31' is in the future"}
    ]
    assert [item["path"] for item in body["imported"]] == [str(good)]
    rt = Runtime.build(settings)
    try:
        assert [p.pms_id for p in asyncio.run(rt.service.search_patients(ORIGIN))] == ["78"]
        assert len(image_rows(rt)) == 1
    finally:
        rt.close()


async def test_a_dicomdir_reference_to_a_symlink_loop_is_refused_and_the_rest_imported(
    runtime: Runtime, tmp_path: Path
) -> None:
    fileset = tmp_path / "media"
    shutil.copytree(REFERENCE_SET / "77654033", fileset / "77654033")
    (fileset / "LA").symlink_to("LB")
    (fileset / "LB").symlink_to("LA")
    directory = pydicom.dcmread(REFERENCE_SET / "DICOMDIR")
    images = [r for r in directory.DirectoryRecordSequence if "ReferencedFileID" in r]
    images[0].ReferencedFileID = ["LA"]
    directory.save_as(fileset / "DICOMDIR")
    report = await run_import(runtime, fileset)
    refused = {p.path: p.reason for p in report.errors}
    assert (
        refused[f"{fileset}/LA"]
        == "the DICOMDIR refers to a path that cannot be resolved (a symbolic link loop): refused"
    )
    assert {item.path for item in report.imported} == {
        f"{fileset}/77654033/CR2/6247",
        f"{fileset}/77654033/CR3/6278",
        f"{fileset}/77654033/CT2/17106",
    }


async def test_a_dicomdir_file_id_longer_than_a_file_name_is_refused_and_the_rest_imported(
    runtime: Runtime, tmp_path: Path
) -> None:
    fileset = tmp_path / "media"
    shutil.copytree(REFERENCE_SET / "77654033", fileset / "77654033")
    directory = pydicom.dcmread(REFERENCE_SET / "DICOMDIR")
    images = [r for r in directory.DirectoryRecordSequence if "ReferencedFileID" in r]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid File ID this test writes on purpose
        images[0].ReferencedFileID = ["X" * 300]
        images[1].ReferencedFileID = ["77654033", "É" * 128]  # 256 bytes of UTF-8
        directory.save_as(fileset / "DICOMDIR")
    report = await run_import(runtime, fileset)
    refused = {p.path: p.reason for p in report.errors}
    too_long = "the DICOMDIR names a file or folder longer than 255 bytes: refused"
    assert refused[f"{fileset}/{'X' * 300}"] == too_long
    assert refused[f"{fileset}/77654033/{'É' * 128}"] == too_long
    assert {item.path for item in report.imported} == {
        f"{fileset}/77654033/CR3/6278",
        f"{fileset}/77654033/CT2/17106",
    }


def _staged(store: Path) -> list[Path]:
    return sorted((store / STAGING).glob("*")) if (store / STAGING).exists() else []


def test_a_task_of_files_writes_each_while_the_next_is_read_and_reports_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool task's files (prepare_many): a file's write runs on while the next file is read, and each
    file still ends as itself: staged with its own bytes, refused for its own reason (not DICOM; the disk
    refusing its write), in the order given."""
    from bridge.dicom import prepare as prepare_module
    from bridge.dicom.fileset import Candidate
    from bridge.dicom.prepare import Stored, Unreadable, prepare_many
    from bridge.store import uncached

    store = tmp_path / "store"
    FileStore(store).create_root()
    paths = [write(dental_dataset(patient_id=f"0{n}"), tmp_path / f"{n}.dcm") for n in range(4)]
    (tmp_path / "not.dcm").write_bytes(b"not DICOM")
    paths.insert(2, tmp_path / "not.dcm")
    writes: list[str] = []
    real_write = uncached.write_new

    def write_new(path: str | os.PathLike[str], data: bytes) -> None:
        writes.append(str(path))
        if len(writes) == 3:  # the fourth file of the task (the third written)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(uncached, "write_new", write_new)
    results = prepare_many([Candidate(str(p), p.name) for p in paths], 0x00100020, 1 << 30, str(store))
    assert [type(r).__name__ for r in results] == ["Stored", "Stored", "Unreadable", "Unreadable", "Stored"]
    refused = [r.problem for r in results if isinstance(r, Unreadable)]
    assert refused[0].path == "not.dcm" and "not a DICOM file" in refused[0].reason
    assert (refused[1].path, refused[1].reason) == ("2.dcm", f"cannot be stored: {os.strerror(errno.ENOSPC)}")
    stored = [r for r in results if isinstance(r, Stored)]
    assert [s.facts.pms_id for s in stored] == ["00", "01", "03"]
    for item, source in zip(stored, [paths[0], paths[1], paths[4]], strict=True):
        assert Path(item.pending).read_bytes() == source.read_bytes()
    assert sorted(Path(s.pending) for s in stored) == _staged(store)
    assert prepare_module.OVERLAP_BELOW > 3 << 20  # these files' writes did overlap the next file


def test_a_task_that_fails_midway_leaves_no_staged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder failing in an unforeseen way ends the task with its exception (the pool reports it);
    the files it had staged already, and the one being written, are removed, not left to the day-old
    leftover sweep."""
    from bridge.dicom import pixels
    from bridge.dicom.fileset import Candidate
    from bridge.dicom.prepare import prepare_many

    store = tmp_path / "store"
    FileStore(store).create_root()
    paths = [write(dental_dataset(patient_id=f"0{n}"), tmp_path / f"{n}.dcm") for n in range(3)]
    real_check = pixels.check
    checked: list[str] = []

    def check(file: Any) -> Any:
        checked.append(file.facts.display)
        if len(checked) == 3:
            raise RuntimeError("a decoder crashed")
        return real_check(file)

    monkeypatch.setattr(pixels, "check", check)
    with pytest.raises(RuntimeError, match="a decoder crashed"):
        prepare_many([Candidate(str(p), p.name) for p in paths], 0x00100020, 1 << 30, str(store))
    assert checked == ["0.dcm", "1.dcm", "2.dcm"]
    assert _staged(store) == []


FAULTS_PER_FILE = """
import resource, sys
from pathlib import Path
from bridge.dicom.fileset import Candidate
from bridge.dicom.prepare import prepare_many
from bridge.imaging.pool import start_worker
start_worker()
files, store = sorted(Path(sys.argv[1]).glob("*.dcm")), sys.argv[2]
def task_by_task():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for start in range(0, len(files), 4):
        task = [Candidate(str(p), p.name) for p in files[start : start + 4]]
        for result in prepare_many(task, 0x00100020, 1 << 30, store):
            Path(result.pending).unlink()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(files)
task_by_task()
print(max(task_by_task() for _ in range(3)))
"""


def test_a_pool_worker_reads_file_after_file_into_the_memory_it_freed(tmp_path: Path) -> None:
    """A pool worker keeps the memory it frees (its initializer, bridge.imaging.pool.start_worker, sets
    bridge.allocator's thresholds): the next file's bytes go where the last one's were, with no page
    faults. glibc's default, with two files held at once (one being written, the next read), handed their
    memory back and mapped fresh pages for about half of the files' pages, which a virtual machine pays
    for page by page. In a process of its own: a clean allocator."""
    sensor_xrays(tmp_path / "files", 8, "FAULTS")
    FileStore(tmp_path / "store").create_root()
    run = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_FILE, str(tmp_path / "files"), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 50, run.stdout  # a 3 MB file is 733 pages


def rle_zeros(rows: int, columns: int) -> bytes:
    """One RLE Lossless frame (DICOM PS3.5 Annex G) of 16-bit zeros: two segments (high bytes, then low
    bytes), each row a run of 128 zeros at a time (header byte 0x81 = -127: repeat the next byte 128
    times) and then the rest (257 - n). A few hundred kilobytes that decode to rows x columns x 2 bytes."""
    whole, rest = divmod(columns, 128)
    row = b"\x81\x00" * whole + (bytes([257 - rest, 0]) if rest else b"")
    segment = row * rows + (b"\x00" if len(row) * rows % 2 else b"")
    offsets = [2, 64, 64 + len(segment)] + [0] * 13
    return b"".join(n.to_bytes(4, "little") for n in offsets) + segment + segment


async def test_a_task_whose_worker_runs_out_of_memory_reports_its_files_and_the_rest_imports(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A pool task that fails in a way no check foresees (here its worker runs out of memory decoding a
    small RLE file into 40 MB of pixels: a real address-space limit on the workers) made the whole import
    fail, and the files other tasks had already put in place stayed in the store with no image referencing
    them. Its files are now reported and the import's other files added; nothing is left in the store that
    no image references. A file too large to be read into memory at all is refused on its own (its read
    fails, not its task)."""
    import resource

    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    folder = tmp_path / "media"
    small = [write(dental_dataset(patient_id="0077"), folder / f"{n}.dcm") for n in range(7)]
    bomb = intraoral_object(patient_id="0077")
    bomb.Rows, bomb.Columns = 4000, 5000  # 40 MB of pixels: more than the workers may map
    bomb.file_meta.TransferSyntaxUID = RLELossless
    bomb.PixelData = encapsulate([rle_zeros(4000, 5000)])
    bomb["PixelData"].VR = "OB"
    write(bomb, folder / "bomb.dcm")
    large = intraoral_object(patient_id="0077")
    large.Rows, large.Columns = 4000, 5000
    large.PixelData = bytes(4000 * 5000 * 2)
    write(large, folder / "large.dcm")
    workers = await runtime.imaging.start_workers()  # their pids: no other process of the machine's
    assert len(workers) == 2
    for pid in workers:
        size = int(Path(f"/proc/{pid}/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        # room for the two 16 MiB buffers a worker holds files in (bridge.store.uncached), not for 40 MB more
        resource.prlimit(pid, resource.RLIMIT_AS, (size + (48 << 20), resource.RLIM_INFINITY))
    report = await run_import(runtime, folder, display="")
    refused = {Path(p.path).name: p.reason for p in report.errors}
    assert refused["bomb.dcm"].startswith("could not be checked: out of memory while it was checked")
    assert refused["large.dcm"] == "cannot be read: Cannot allocate memory"
    assert set(refused) <= {"bomb.dcm", "large.dcm", *(p.name for p in small)}  # and bomb's task's
    assert len(report.imported) + len(refused) == 9 and len(report.imported) >= 6  # tasks of 2 files
    assert stored_files(runtime) == {row.sha256 for row in image_rows(runtime)}


async def test_an_import_cancelled_midway_leaves_no_file_that_no_image_references(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Ctrl-C on `pms-bridge import` cancels its import: the files already put in place for images not added
    yet stayed in the store with no image referencing them. They are removed; only what pool tasks still
    running stage may stay in the staging folder (swept by `serve`)."""
    sensor_xrays(tmp_path / "media", 30, "0088")
    root = runtime.settings.store.images

    def in_place() -> set[str]:
        return {p.stem for p in root.glob("??/??/*") if p.is_file()}

    importing = asyncio.ensure_future(run_import(runtime, tmp_path / "media"))
    while not in_place():
        assert not importing.done(), "the import ended before a file was in place"
        await asyncio.sleep(0.002)
    importing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await importing
    rows = {row.sha256 for row in image_rows(runtime)}
    assert len(rows) < 30  # cancelled midway
    assert in_place() == rows


@pytest.mark.parametrize("count", [0, 1, 3, 8, 17, 100, 1001])
def test_files_found_at_once_are_cut_into_pool_tasks_that_shrink_towards_the_end(count: int) -> None:
    """Every file in exactly one task, in order; tasks of `FILES_PER_TASK` while each of the slots gets
    that many, then smaller ones, the last ones single files (so no worker waits long for the other's last
    task); never more tasks than files."""
    slots = 4
    bounds = task_bounds(count, slots)
    assert [i for start, end in bounds for i in range(start, end)] == list(range(count))
    sizes = [end - start for start, end in bounds]
    assert all(1 <= size <= FILES_PER_TASK for size in sizes)
    assert sizes == sorted(sizes, reverse=True)
    if count >= 2 * slots:
        assert sizes[-slots:] == [1] * slots
    if count >= 4 * FILES_PER_TASK * slots:
        assert sizes.count(FILES_PER_TASK) >= count // FILES_PER_TASK - 2 * slots
