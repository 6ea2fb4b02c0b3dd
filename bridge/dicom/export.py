"""`pms-bridge export-dicom`: one patient's images as a DICOM File Set with a DICOMDIR, as DTX Studio Clinic
exports them (its conformance statement, tables 5 and 6).

Layout: `DICOMDIR` and `PT000000/STnnnnnn/SEnnnnnn/IMnnnnnn` (file IDs of at most 8 characters, A-Z 0-9 _).

What each file is:

* an image stored as DICOM is exported as stored, keeping its tags, with what media interchange needs:
  our Implementation Class UID and Version Name and the Patient ID (table 5); the patient attributes as
  the store knows the patient (Patient's Name, Birth Date, Sex), so the set does not contradict itself, and
  the Issuer of Patient ID removed (it qualified the replaced id); the file set's Specific Character Set
  (text re-encoded, never changed); Explicit VR Little Endian, the transfer syntax of the General Purpose
  profiles (compressed pixel data is decompressed with the decoders import uses, values unchanged; lossy
  sources keep Lossy Image Compression 01); and the keys a DICOMDIR record needs (Study Date and Time, Study
  ID, Series Number, Instance Number) filled from the store where the file lacks them, never overwritten;
* an image that was not DICOM is wrapped (bridge.dicom.wrap) with the attributes of table 6 that the
  store knows.

Profiles: `general` is STD-GEN-CD; `dental` is STD-DEN-CD (PS3.11 Dental Radiograph Interchange), which
holds only intra-oral and DX radiographs for presentation, wants the equipment attributes InstitutionName,
ManufacturerModelName, DetectorID, DetectorManufacturerName and DetectorManufacturerModelName present
(added empty when unknown), and Bits Stored 8, 10, 12 or 16 (raised to the next of those; the values are
unchanged). Other images are left out of a dental set, each named in the report.

Modes: DICOM export is of originals only, as in DTX Studio Clinic; `filtered` is refused.

The files are written by the imaging process pool, the DICOMDIR last (atomically): a set is complete when
its DICOMDIR is there, and it lists exactly the files written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.atomic import write_atomic
from bridge.dicom import (
    EXPLICIT_LE,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_LE,
    SOURCE_AE_TITLE,
    dicomdir,
    read,
)
from bridge.model import Action, ImageDetails, ImageView, Origin, PatientRequest, PatientView, Sex

if TYPE_CHECKING:
    from bridge.runtime import Runtime

PROFILES = ("general", "dental")
MODES = ("original", "filtered")
DENTAL_SOP_CLASSES = (read.IO_PRESENTATION, read.DX_PRESENTATION)
DENTAL_BITS = (8, 10, 12, 16)
DENTAL_EQUIPMENT = (
    "InstitutionName",
    "ManufacturerModelName",
    "DetectorID",
    "DetectorManufacturerName",
    "DetectorManufacturerModelName",
)
LATIN_1_SETS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 100", "ISO 2022 IR 100"})
# Patient-module attributes that describe the patient as the source system knew the replaced id.
_REPLACED_ID_QUALIFIERS = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence")
# Patient-module attributes compared across originals (the ones set from the store are not).
_PATIENT_EXTRAS = (
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "TypeOfPatientID",
)
_EXPORT_CONCURRENCY = 4


class ExportNotWritten(Exception):
    """The file set could not be written: its folder cannot be created, or its DICOMDIR cannot be written
    (a full disk). What this export wrote is removed again: a set without its DICOMDIR is not a set."""


class ExportRefused(Exception):
    """The export cannot be made as asked; nothing was written. The message says why."""


@dataclass(frozen=True)
class Job:
    """What one pool worker needs to write one exported file."""

    image_id: int
    source: str
    target: str
    file_id: tuple[str, ...]
    is_dicom: bool
    details: ImageDetails
    patient: dict[str, Any]  # Patient module values to set; None removes the attribute
    study: dict[str, Any]  # wrapped: set; original: filled where missing or empty
    series: dict[str, Any]
    instance_number: int
    equipment: dict[str, str]
    charset: str
    profile: str


@dataclass(frozen=True)
class Written:
    """A file of the set, with the keys its DICOMDIR records need (read from what was written)."""

    image_id: int
    file_id: tuple[str, ...]
    sop_class_uid: str
    sop_instance_uid: str
    how: str  # original | wrapped
    note: str
    study: dict[str, str]
    series: dict[str, Any]
    instance_number: int


@dataclass(frozen=True)
class NotWritten:
    """An image left out of the set: on purpose (`skipped`, e.g. by the dental profile) or by an error."""

    image_id: int
    reason: str
    skipped: bool


@dataclass
class ExportReport:
    """The file set written: every image exported (how and where), left out, or failed, and why."""

    out: str
    written: list[Written] = field(default_factory=list)
    skipped: list[NotWritten] = field(default_factory=list)
    errors: list[NotWritten] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "exported": [
                {
                    "image_id": w.image_id,
                    "file": "/".join(w.file_id),
                    "sop_class_uid": w.sop_class_uid,
                    "how": w.how,
                    **({"note": w.note} if w.note else {}),
                }
                for w in self.written
            ],
            "skipped": [{"image_id": s.image_id, "reason": s.reason} for s in self.skipped],
            "errors": [{"image_id": e.image_id, "reason": e.reason} for e in self.errors],
        }


# --------------------------------------------------------------------------------------------------
# Planning (event loop side)


async def export_patient(
    rt: Runtime,
    origin: Origin,
    *,
    pms_id: str,
    out: Path,
    profile: str = "general",
    mode: str = "original",
    pms_system: str | None = None,
    practice_id: str | None = None,
) -> ExportReport:
    """Write the DICOM File Set of the patient the PMS knows as `pms_id` into the empty folder `out`."""
    if mode == "filtered":
        raise ExportRefused(
            "DICOM export is of originals only, as in DTX Studio Clinic: --mode filtered is refused"
            " (filtered, oriented renderings are exported as JPG, PNG or TIF through the PMS export)"
        )
    if mode not in MODES or profile not in PROFILES:
        raise ExportRefused(
            f"--mode must be one of {', '.join(MODES)} and --profile one of {', '.join(PROFILES)}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportRefused(
            f"{out} exists and is not an empty folder: a file set is written into a new folder"
        )
    settings = rt.settings.dicom
    request = PatientRequest(
        Action.LIST_IMAGES,
        origin,
        pms_system if pms_system is not None else settings.pms_system,
        pms_id,
        practice_id=practice_id if practice_id is not None else settings.practice_id,
    )
    outcome = await rt.service.handle(request)
    if not outcome.status.ok or outcome.patient is None:
        raise ExportRefused(outcome.message)
    details = await rt.service.image_details(origin, outcome.patient.id)
    if not details:
        raise ExportRefused(f"patient {pms_id!r} has no images to export")
    sources = {d.image.id: str(rt.files.path_for(d.image.sha256, d.image.file_ext)) for d in details}
    originals = [sources[d.image.id] for d in details if d.image.file_ext == "dcm"]
    scanned = await rt.imaging.run_in_pool(scan_originals, originals)
    charset = choose_charset(outcome.patient, details, rt.settings.dicom.institution_name, scanned)
    wrapped = any(d.image.file_ext != "dcm" for d in details)
    patient = patient_module(outcome.patient, scanned, wrapped=wrapped, charset=charset)
    equipment = {
        "InstitutionName": settings.institution_name,
        "InstitutionAddress": settings.institution_address,
        "InstitutionalDepartmentName": settings.institution_department,
    }
    jobs = plan(details, sources, out, patient, equipment, charset, profile)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportNotWritten(f"cannot create the folder {out}: {exc.strerror or exc}") from None
    slots = asyncio.Semaphore(_EXPORT_CONCURRENCY)

    async def run(job: Job) -> Written | NotWritten:
        async with slots:
            return await rt.imaging.run_in_pool(write_instance, job)

    report = ExportReport(str(out))
    for result in await asyncio.gather(*(run(job) for job in jobs)):
        if isinstance(result, Written):
            report.written.append(result)
        else:
            (report.skipped if result.skipped else report.errors).append(result)
    report.written.sort(key=lambda w: w.file_id)
    if not report.written:
        await asyncio.to_thread(_remove_written, out, [], created)
        reasons = "; ".join(sorted({r.reason for r in report.skipped + report.errors}))
        raise ExportRefused(f"nothing to export for patient {pms_id!r}: {reasons}")
    directory = await rt.imaging.run_in_pool(dicomdir.build, tree(report.written, patient), charset)
    try:
        await asyncio.to_thread(write_atomic, out / "DICOMDIR", directory)
    except OSError as exc:
        await asyncio.to_thread(_remove_written, out, report.written, created)
        raise ExportNotWritten(
            f"the DICOMDIR cannot be written into {out} ({exc.strerror or exc}): the set is incomplete,"
            f" and the {len(report.written)} image files written were removed"
        ) from None
    return report


def _remove_written(out: Path, written: list[Written], created: bool) -> None:
    """Remove the files of an export that failed, the folders it made for them, and `out` if the export
    created it: the folder was new or empty, so nothing else is touched."""
    for item in written:
        out.joinpath(*item.file_id).unlink(missing_ok=True)
    for folder, _, _ in sorted(os.walk(out), key=lambda entry: -len(entry[0])):
        if folder != str(out) or created:
            with contextlib.suppress(OSError):  # not empty: something else is in it
                os.rmdir(folder)


async def instance_bytes(rt: Runtime, origin: Origin, image: ImageView) -> bytes:
    """One image as a DICOM Part 10 file, for a PMS that asks for a DCM copy (VDDS MMOEXPORT).

    A stored DICOM original is returned as it is; any other image is wrapped exactly as `export-dicom`
    wraps it (its IOD by category, the patient's attributes, the equipment of `[dicom]`).
    """
    source = rt.files.path_for(image.sha256, image.file_ext)
    if image.file_ext == "dcm":
        return await asyncio.to_thread(source.read_bytes)
    patient = await rt.service.get_patient(origin, image.patient_id)
    details = [d for d in await rt.service.image_details(origin, image.patient_id) if d.image.id == image.id]
    if patient is None or not details:
        raise ExportRefused(f"image {image.id} is no longer in the store")
    settings = rt.settings.dicom
    charset = choose_charset(patient, details, settings.institution_name, [])
    equipment = {
        "InstitutionName": settings.institution_name,
        "InstitutionAddress": settings.institution_address,
        "InstitutionalDepartmentName": settings.institution_department,
    }
    with tempfile.TemporaryDirectory(prefix="pms-bridge-dcm-") as tmp:
        module = patient_module(patient, [], wrapped=True, charset=charset)
        [job] = plan(details, {image.id: str(source)}, Path(tmp), module, equipment, charset, "general")
        result = await rt.imaging.run_in_pool(write_instance, job)
        if isinstance(result, NotWritten):
            raise ExportRefused(f"image {image.id}: {result.reason}")
        return await asyncio.to_thread(Path(tmp).joinpath(*result.file_id).read_bytes)


def choose_charset(
    patient: PatientView, details: list[ImageDetails], institution: str, scanned: list[dict[str, Any]]
) -> str:
    """The file set's one Specific Character Set: ISO_IR 100 (Latin-1) when every text fits it and every
    original uses it or the default repertoire; else ISO_IR 192 (UTF-8), which holds everything."""
    texts = [patient.last_name, patient.first_name, patient.middle_name, patient.title, institution]
    for d in details:
        texts += [d.study_description, d.series_description, d.image.device]
    try:
        "".join(texts).encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    for facts in scanned:
        if not set(facts["charset"]) <= LATIN_1_SETS:
            return "ISO_IR 192"
    return "ISO_IR 100"


PN_GROUP_BYTES = 64  # a PN component group holds 64 characters (PS3.5 6.2); counted as bytes, see person_name
_PN_DELIMITERS = str.maketrans({"\\": " ", "^": " ", "=": " "})


def person_name(family: str, given: str, middle: str, prefix: str, charset: str) -> str:
    """A DICOM PN of the store's name parts, whatever text they hold (PS3.5 6.2).

    A backslash, caret or equals sign inside a part is a delimiter of PN (values, components, component
    groups): each becomes a space, so "Back\\Slash" stays one name and "Care^t" one given name. Control
    characters become spaces too. The group holds 64 characters; it is kept within 64 bytes of the set's
    character set (dciodvfy counts bytes, so UTF-8 names count each byte), cutting the longest part first,
    one character at a time (never inside one), so every part keeps what it can.
    """
    encoding = "latin-1" if charset == "ISO_IR 100" else "utf-8"
    parts = [
        "".join(" " if ord(c) < 32 or c == "\x7f" else c for c in text.translate(_PN_DELIMITERS)).strip()
        for text in (family, given, middle, prefix)
    ]

    def size() -> int:
        return len("^".join(parts).rstrip("^").encode(encoding, "replace"))

    while size() > PN_GROUP_BYTES:
        longest = max(range(len(parts)), key=lambda i: (len(parts[i].encode(encoding, "replace")), -i))
        parts[longest] = parts[longest][:-1].rstrip()
    return "^".join(parts).rstrip("^")


def patient_module(
    patient: PatientView, scanned: list[dict[str, Any]], *, wrapped: bool, charset: str
) -> dict[str, Any]:
    """The Patient module of every file: the store's patient; other patient attributes the originals carry
    are kept only where every file agrees, wrapped ones (which carry none) included. None removes one."""
    name = person_name(patient.last_name, patient.first_name, patient.middle_name, patient.title, charset)
    module: dict[str, Any] = {
        "PatientName": name,
        "PatientID": patient.pms_id or "",
        "PatientBirthDate": patient.birth_date.strftime("%Y%m%d") if patient.birth_date else "",
        "PatientSex": patient.sex.value if patient.sex in (Sex.MALE, Sex.FEMALE, Sex.OTHER) else "",
    }
    for keyword in _REPLACED_ID_QUALIFIERS:
        module[keyword] = None
    others: dict[str, set[str]] = {keyword: {"<absent>"} for keyword in _PATIENT_EXTRAS} if wrapped else {}
    for facts in scanned:
        for keyword in _PATIENT_EXTRAS:
            others.setdefault(keyword, set()).add(facts["patient"].get(keyword, "<absent>"))
    for keyword, values in others.items():
        if keyword not in module and len(values) > 1:
            module[keyword] = None
    return module


def _date_time(moment: datetime | None) -> tuple[str, str]:
    return (moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")) if moment else ("", "")


def _when(details: ImageDetails) -> datetime:
    """When an image's study took place, as the practice's wall clock: the study date, else the capture
    time, else (a DICOMDIR needs a study date) when the image entered the store, in local time."""
    known = details.study_date or details.image.captured_at
    return known if known is not None else details.imported_at.astimezone().replace(tzinfo=None)


def plan(
    details: list[ImageDetails],
    sources: dict[int, str],
    out: Path,
    patient: dict[str, Any],
    equipment: dict[str, str],
    charset: str,
    profile: str,
) -> list[Job]:
    """One job per image, in study > series > image order, with file IDs and the keys records need."""
    studies: dict[str, list[ImageDetails]] = {}
    for d in sorted(details, key=lambda d: (_when(d), d.image.id)):
        studies.setdefault(d.image.study_uid, []).append(d)
    jobs: list[Job] = []
    for study_index, (study_uid, in_study) in enumerate(studies.items()):
        first = in_study[0]
        study_date, study_time = _date_time(_when(first))
        study = {
            "StudyInstanceUID": study_uid,
            "StudyDate": study_date,
            "StudyTime": study_time,
            "StudyID": str(study_index + 1),
            "StudyDescription": first.study_description,
            "AccessionNumber": first.accession_number,
            "ReferringPhysicianName": "",
        }
        series_of: dict[str, list[ImageDetails]] = {}
        for d in in_study:
            series_of.setdefault(d.image.series_uid, []).append(d)
        for series_index, (series_uid, in_series) in enumerate(series_of.items()):
            series = {
                "SeriesInstanceUID": series_uid,
                "SeriesNumber": in_series[0].series_number or series_index + 1,
                "SeriesDescription": in_series[0].series_description,
            }
            for image_index, d in enumerate(in_series):
                file_id = (
                    "PT000000",
                    f"ST{study_index:06d}",
                    f"SE{series_index:06d}",
                    f"IM{image_index:06d}",
                )
                jobs.append(
                    Job(
                        image_id=d.image.id,
                        source=sources[d.image.id],
                        target=str(out.joinpath(*file_id)),
                        file_id=file_id,
                        is_dicom=d.image.file_ext == "dcm",
                        details=d,
                        patient=patient,
                        study=study,
                        series=series,
                        instance_number=image_index + 1,
                        equipment=equipment,
                        charset=charset,
                        profile=profile,
                    )
                )
    return jobs


def tree(written: list[Written], patient: dict[str, Any]) -> list[dicomdir.Node]:
    """The DICOMDIR hierarchy of the written files (one patient)."""
    root = dicomdir.Node("PATIENT", {key: patient[key] for key in ("PatientID", "PatientName")})
    studies: dict[str, dicomdir.Node] = {}
    series: dict[str, dicomdir.Node] = {}
    for w in written:
        study_uid = w.study["StudyInstanceUID"]
        if study_uid not in studies:
            studies[study_uid] = dicomdir.Node("STUDY", dict(w.study))
            root.children.append(studies[study_uid])
        series_uid = w.series["SeriesInstanceUID"]
        if series_uid not in series:
            series[series_uid] = dicomdir.Node("SERIES", dict(w.series))
            studies[study_uid].children.append(series[series_uid])
        image = {
            "ReferencedFileID": list(w.file_id),
            "ReferencedSOPClassUIDInFile": w.sop_class_uid,
            "ReferencedSOPInstanceUIDInFile": w.sop_instance_uid,
            "ReferencedTransferSyntaxUIDInFile": EXPLICIT_LE,
            "InstanceNumber": w.instance_number,
        }
        series[series_uid].children.append(dicomdir.Node("IMAGE", image))
    return [root]


# --------------------------------------------------------------------------------------------------
# Writing (process pool side)


def scan_originals(paths: list[str]) -> list[dict[str, Any]]:
    """The character sets and patient attributes of the originals to export (headers only)."""
    import pydicom

    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: S112 - a damaged file fails again, reported, when it is written
                continue
            charset = ds.get("SpecificCharacterSet") or [""]
            values = [charset] if isinstance(charset, str) else list(charset)
            patient = {k: repr(ds[k].value) for k in _PATIENT_EXTRAS if k in ds}
            found.append({"charset": [str(v).strip().upper() for v in values], "patient": patient})
    return found


def write_instance(job: Job) -> Written | NotWritten:
    """Build and write one file of the set (in the pool); NotWritten says why it was left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about non-conformant values it keeps as they are
        try:
            return _write(job)
        except FileNotFoundError:
            return NotWritten(job.image_id, "the image's file is missing from the image store", skipped=False)
        except Exception as exc:  # decoders and parsers raise many kinds for damaged data
            return NotWritten(
                job.image_id, f"cannot be exported ({type(exc).__name__}: {exc})", skipped=False
            )


def _write(job: Job) -> Written | NotWritten:
    ds, how, note = _original(job) if job.is_dicom else _wrapped(job)
    if job.profile == "dental":
        if str(ds.SOPClassUID) not in DENTAL_SOP_CLASSES:
            kind = read.SOP_CLASSES.get(str(ds.SOPClassUID), "other object")
            reason = (
                "left out of the dental profile (STD-DEN-CD holds intra-oral and DX radiographs for"
                f" presentation; this is a {kind})"
            )
            return NotWritten(job.image_id, reason, skipped=True)
        _dental(ds, job)
    _file_meta(ds)
    target = Path(job.target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(target, enforce_file_format=True)
    except BaseException:  # a full disk: no partial file is left in the set
        target.unlink(missing_ok=True)
        raise
    return Written(
        image_id=job.image_id,
        file_id=job.file_id,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        how=how,
        note=note,
        study={k: str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID")}
        | {k: str(ds.get(k, "") or "") for k in ("StudyDescription", "AccessionNumber")},
        series={
            "Modality": str(ds.Modality),
            "SeriesInstanceUID": str(ds.SeriesInstanceUID),
            "SeriesNumber": int(ds.SeriesNumber),
        },
        instance_number=int(ds.InstanceNumber),
    )


def _original(job: Job) -> tuple[Any, str, str]:
    """A stored DICOM file prepared for the set (the module doc lists every change)."""
    import pydicom

    ds = pydicom.dcmread(job.source)
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax in read.LOSSY_SYNTAXES and str(ds.get("LossyImageCompression", "")) != "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = read.LOSSY_SYNTAXES[syntax]
    if syntax not in (EXPLICIT_LE, IMPLICIT_LE):
        ds.decompress(generate_instance_uid=False)  # the instance is the same; only its encoding changes
    ds.decode()  # every text to str in the file's own character set, re-encoded in the set's on writing
    ds.SpecificCharacterSet = job.charset
    _set_patient(ds, job.patient)
    _fill(ds, job.study)
    _fill(ds, job.series)
    _fill(ds, {"Modality": job.details.series_modality or "OT"})
    if not {"Laterality", "ImageLaterality", "FrameLaterality"} & set(ds.dir()):
        ds.Laterality = ""  # Type 2C, present and empty (unknown): validators cannot tell a paired body part
    if not str(ds.get("InstanceNumber", "") or "").strip():
        ds.InstanceNumber = job.instance_number
    _fill(ds, {k: v for k, v in job.equipment.items() if v})
    return ds, "original", ""


def _wrapped(job: Job) -> tuple[Any, str, str]:
    """A stored PNG, TIFF or JPEG wrapped as a DICOM object (bridge.dicom.wrap)."""
    import io

    from PIL import Image

    from bridge.dicom.wrap import decoded_pixels, wrap
    from bridge.imaging.analyze import decode

    data = Path(job.source).read_bytes()
    decoded = decode(data)
    with Image.open(io.BytesIO(data)) as img:
        raw_dpi = img.info.get("dpi")
    dpi = (float(raw_dpi[0]), float(raw_dpi[1])) if raw_dpi else None
    if dpi and decoded.attributes.get("exif_orientation", 1) >= 5:
        dpi = (dpi[1], dpi[0])  # the decoder turned the pixels a quarter (EXIF 5-8): the file's x is now y
    details = job.details
    wrapped = wrap(
        details.image, details.attributes, decoded_pixels(decoded), decoded.bits_stored, dpi, _when(details)
    )
    ds = wrapped.dataset
    ds.SpecificCharacterSet = job.charset
    _set_patient(ds, job.patient)
    for values in (job.study, job.series):
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    ds.InstanceNumber = job.instance_number
    for keyword, value in job.equipment.items():
        if value:
            setattr(ds, keyword, value)
    ds.Manufacturer = ""
    return ds, "wrapped", wrapped.note


def _set_patient(ds: Any, module: dict[str, Any]) -> None:
    for keyword, value in module.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _fill(ds: Any, values: dict[str, Any]) -> None:
    """Set the attributes a file lacks or leaves empty; never overwrite a value it has."""
    for keyword, value in values.items():
        if keyword not in ds or not str(ds.get(keyword) or "").strip():
            setattr(ds, keyword, value)


def _dental(ds: Any, job: Job) -> None:
    """What STD-DEN-CD wants beyond the IOD (module doc)."""
    import numpy as np

    for keyword in DENTAL_EQUIPMENT:
        if keyword not in ds:
            setattr(ds, keyword, job.equipment.get(keyword, ""))
    bits = int(ds.BitsStored)
    if bits not in DENTAL_BITS:
        wanted = next(b for b in DENTAL_BITS if b >= bits)
        pixels = ds.pixel_array  # values masked to the old Bits Stored: bits above it may hold anything
        ds.BitsStored, ds.HighBit = wanted, wanted - 1
        allocated = int(ds.BitsAllocated)
        signed = int(ds.PixelRepresentation) == 1
        ds.PixelData = np.ascontiguousarray(
            pixels, dtype=f"<{'i' if signed else 'u'}{allocated // 8}"
        ).tobytes()


def _file_meta(ds: Any) -> None:
    """Our implementation identity (table 5), the SOP identity and Explicit VR Little Endian."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = SOURCE_AE_TITLE
    ds.file_meta = meta
