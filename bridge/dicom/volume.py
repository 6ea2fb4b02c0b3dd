"""A CT series of single-slice files becomes one multi-frame volume, as DTX Studio Clinic does on import.

The volume is a Legacy Converted Enhanced CT Image (PS3.3 A.70), the IOD the standard defines for exactly
this conversion: its functional groups carry each slice's position and the shared orientation, spacing
and rescale; the slices' other attributes are kept (constant ones in the Unassigned Shared Converted
Attributes, varying ones per frame), and each frame names its source instance (Conversion Source
Attributes). pms-bridge is recorded as Enhanced Multi-frame Conversion Equipment (DCM 109106). The Enhanced
CT IOD proper was not chosen: it requires acquisition facts (acquisition type, collimation, CTDIvol ...)
that single-slice files do not carry, which DTX Studio Clinic itself leaves out (its table 7).

The series keeps its Series Instance UID; the volume's SOP Instance UID is derived from its sources, and
nothing in it depends on the clock, so importing the same series again yields the same object (and is
recognised as already imported). Pixels are decoded from each slice and stored uncompressed, unchanged.
"""

from __future__ import annotations

import io
import itertools
import os
import uuid
import warnings
from typing import Any

import numpy as np

from bridge import __version__
from bridge.dicom import EXPLICIT_LE, read
from bridge.dicom.fileset import OutsideFolders, open_inside

# Attributes of the slices that belong at the top level of the volume: the Patient, Patient Study, General
# Study, General Series, Frame of Reference and General Equipment modules (PS3.3 C.7), the same for every
# slice of a series; validators compare them across the files of a patient, study and series.
_TOP_LEVEL = (
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    # Patient Study
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "MedicalAlerts",
    "Allergies",
    "SmokingStatus",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientState",
    # General Study
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    # General Series
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "Modality",
    "BodyPartExamined",
    "PatientPosition",
    "ProtocolName",
    "OperatorsName",
    "PerformingPhysicianName",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID",
    "PerformedProcedureStepDescription",
    "RequestAttributesSequence",
    "ReferencedPerformedProcedureStepSequence",
    # Frame of Reference
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    # General Equipment
    "Manufacturer",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "InstitutionalDepartmentName",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "SpatialResolution",
    "DateOfLastCalibration",
    "TimeOfLastCalibration",
)
# The Image Pixel description, the same for every slice of one volume.
_PIXEL_DESCRIPTION = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
# What the slices must share to be one volume.
_MUST_AGREE = (*_PIXEL_DESCRIPTION, "PatientID", "StudyInstanceUID", "FrameOfReferenceUID")
# Attributes the conversion places itself (pixel description, geometry, rescale, window, identity).
_PLACED = frozenset(
    {
        *_TOP_LEVEL,
        *_PIXEL_DESCRIPTION,
        "PixelData",
        "SOPClassUID",
        "SOPInstanceUID",
        "ImageType",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "WindowCenterWidthExplanation",
        "BurnedInAnnotation",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        "ContentDate",
        "ContentTime",
        "InstanceNumber",
        "NumberOfFrames",
        "Laterality",
    }
)
# Equipment attributes the Enhanced General Equipment module requires with a value (type 1).
_EQUIPMENT = ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions")
_UID_NAMESPACE = uuid.UUID("4c0b2a1e-8e0e-4a3e-9d5e-7f2b6a0c9d11")  # pms-bridge CT volumes
_ORIENTATION_TOLERANCE = 1e-4
_SPACING_TOLERANCE = 1e-3


class VolumeError(ValueError):
    """A slice of the series is damaged, so the series is not imported; `path` names that slice."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # both in args: the exception crosses the process pool by pickle
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class NotOneVolume(VolumeError):
    """The slices are sound but do not form one volume (another size, orientation, a duplicate position):
    they are imported one by one instead."""


def volume_uid(source_uids: list[str]) -> str:
    """The volume's SOP Instance UID: the same sources always give the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(sorted(source_uids))).int}"


def build_volume(slices: list[tuple[str, str]], within: tuple[str, ...] = ()) -> bytes:
    """The Part 10 bytes of the volume stacked from `slices` (path, display), in slice order; `within` as
    in fileset.Candidate (a slice outside those folders is refused as unreadable)."""
    import pydicom

    datasets: list[tuple[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, display in slices:
            try:
                with os.fdopen(open_inside(path, within), "rb") as file:
                    datasets.append((display, pydicom.dcmread(file)))
            except OutsideFolders as exc:
                raise VolumeError(display, str(exc)) from None
            except Exception as exc:  # a parser meeting hostile bytes fails in many ways
                raise VolumeError(display, f"unreadable CT slice ({type(exc).__name__}: {exc})") from None
        ordered = _ordered(datasets)
        frames = []
        for display, ds in ordered:
            try:
                frames.append(ds.pixel_array)
            except Exception as exc:  # decoders raise many kinds for damaged data
                raise VolumeError(display, f"corrupt or truncated CT slice pixel data: {exc}") from None
        volume = _dataset(ordered, np.stack(frames))
        out = io.BytesIO()
        volume.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ordered(datasets: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The slices sorted along the normal of their common orientation; NotOneVolume when they differ."""
    first_display, first = datasets[0]
    positions: dict[str, list[float]] = {}
    for display, ds in datasets:
        for name in _MUST_AGREE:
            if str(ds.get(name, "")) != str(first.get(name, "")):
                raise NotOneVolume(display, f"differs from {first_display} in {name}")
        for name, tolerance in (
            ("ImageOrientationPatient", _ORIENTATION_TOLERANCE),
            ("PixelSpacing", _SPACING_TOLERANCE),
        ):
            mine, theirs = _floats(ds, name), _floats(first, name)
            if mine is None or theirs is None or len(mine) != len(theirs):
                raise NotOneVolume(display, f"has no valid {name}")
            if any(abs(a - b) > tolerance for a, b in zip(mine, theirs, strict=True)):
                raise NotOneVolume(display, f"differs from {first_display} in {name}")
        position = _floats(ds, "ImagePositionPatient")
        if position is None or len(position) != 3:
            raise NotOneVolume(display, "has no valid ImagePositionPatient")
        positions[display] = position
        if str(ds.get("PhotometricInterpretation", "")) != "MONOCHROME2" or ds.get("SamplesPerPixel", 1) != 1:
            raise NotOneVolume(display, "is not MONOCHROME2")
    orientation = _floats(first, "ImageOrientationPatient") or []
    if len(orientation) != 6:
        raise NotOneVolume(first_display, "has no valid ImageOrientationPatient")
    normal = np.cross(np.array(orientation[:3]), np.array(orientation[3:]))
    keyed = sorted(
        ((float(np.dot(normal, positions[display])), display, ds) for display, ds in datasets),
        key=lambda item: item[0],
    )
    for (low, _d, _ds), (high, display, _ds2) in itertools.pairwise(keyed):
        if abs(high - low) < 1e-6:
            raise NotOneVolume(display, "lies at the same position as another slice")
    return [(display, ds) for _key, display, ds in keyed]


def _floats(ds: Any, name: str) -> list[float] | None:
    value = ds.get(name)
    if value is None:
        return None
    try:
        items = list(value) if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") else [value]
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def _item(**values: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    for name, value in values.items():
        setattr(item, name, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Any:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _varying(ordered: list[tuple[str, Any]], tags: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split the slices' remaining attributes into (constant, varying) tags; private groups move whole."""
    constant: list[Any] = []
    varying: list[Any] = []
    by_group: dict[tuple[int, int], bool] = {}
    for tag in tags:
        values = {repr(ds[tag].value) if tag in ds else "<absent>" for _display, ds in ordered}
        differs = len(values) > 1
        if tag.is_private:
            block = (tag.group, (tag.element >> 8) if tag.element > 0xFF else tag.element)
            by_group[block] = by_group.get(block, False) or differs
        else:
            (varying if differs else constant).append(tag)
    for tag in tags:
        if tag.is_private:
            block = (tag.group, (tag.element >> 8) if tag.element > 0xFF else tag.element)
            (varying if by_group[block] else constant).append(tag)
    return constant, varying


def _dataset(ordered: list[tuple[str, Any]], pixels: np.ndarray[Any, Any]) -> Any:
    """The Legacy Converted Enhanced CT dataset of the sorted slices and their stacked pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag
    from pydicom.uid import UID

    from bridge.dicom import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    first = ordered[0][1]
    sources = [str(ds.SOPInstanceUID) for _display, ds in ordered]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(read.LEGACY_CONVERTED_CT)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(volume_uid(sources))
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    for name in _TOP_LEVEL:
        if name in first:
            ds[name] = first[name]
    image_type = list(first.get("ImageType", ["ORIGINAL", "PRIMARY"]))
    flavor = ["ORIGINAL" if image_type[:1] == ["ORIGINAL"] else "DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.ImageType = flavor
    ds.SOPClassUID = read.LEGACY_CONVERTED_CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for name in _EQUIPMENT:  # type 1 in the Enhanced General Equipment module
        if not str(ds.get(name, "") or "").strip():
            setattr(ds, name, "UNKNOWN")
    ds.ContentDate = first.get("ContentDate") or first.get("AcquisitionDate") or first.get("StudyDate", "")
    ds.ContentTime = first.get("ContentTime") or first.get("AcquisitionTime") or first.get("StudyTime", "")
    ds.InstanceNumber = 1
    ds.Laterality = first.get("Laterality", "")
    ds.NumberOfFrames = len(ordered)
    for name in _PIXEL_DESCRIPTION:
        ds[name] = first[name]
    ds.BurnedInAnnotation = first.get("BurnedInAnnotation", "NO") or "NO"
    _lossy(ds, ordered)
    ds.PresentationLUTShape = "IDENTITY"
    ds.ContentQualification = "PRODUCT"
    ds.AcquisitionContextSequence = Sequence([])
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContributingEquipmentSequence = Sequence(
        [
            _item(
                PurposeOfReferenceCodeSequence=Sequence(
                    [_code("109106", "DCM", "Enhanced Multi-frame Conversion Equipment")]
                ),
                Manufacturer="pms-bridge",
                ManufacturerModelName="pms-bridge",
                SoftwareVersions=__version__,
            )
        ]
    )
    remaining = sorted(
        {elem.tag for _display, slice_ds in ordered for elem in slice_ds if elem.tag.group != 0x0002}
        - {Tag(name) for name in _PLACED},
    )
    constant, varying = _varying(ordered, remaining)
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence(
        [_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.get("SliceThickness", ""))]
    )
    shared.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=first.ImageOrientationPatient)])
    shared.CTImageFrameTypeSequence = Sequence(
        [
            _item(
                FrameType=flavor,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ]
    )
    unassigned = Dataset()
    for tag in constant:
        if tag in first:
            unassigned[tag] = first[tag]
    shared.UnassignedSharedConvertedAttributesSequence = Sequence([unassigned])
    per_frame_rescale = _differs(ordered, ("RescaleIntercept", "RescaleSlope"))
    per_frame_window = _differs(ordered, ("WindowCenter", "WindowWidth"))
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = Sequence([_rescale(first)])
    if not per_frame_window and "WindowCenter" in first and "WindowWidth" in first:
        shared.FrameVOILUTSequence = Sequence([_window(first)])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for index, (_display, slice_ds) in enumerate(ordered, start=1):
        frame = Dataset()
        frame.FrameContentSequence = Sequence(
            [_item(StackID="1", InStackPositionNumber=index, DimensionIndexValues=[1, index])]
        )
        frame.PlanePositionSequence = Sequence([_item(ImagePositionPatient=slice_ds.ImagePositionPatient)])
        if per_frame_rescale:
            frame.PixelValueTransformationSequence = Sequence([_rescale(slice_ds)])
        if per_frame_window and "WindowCenter" in slice_ds and "WindowWidth" in slice_ds:
            frame.FrameVOILUTSequence = Sequence([_window(slice_ds)])
        own = Dataset()
        for tag in varying:
            if tag in slice_ds:
                own[tag] = slice_ds[tag]
        frame.UnassignedPerFrameConvertedAttributesSequence = Sequence([own])
        frame.ConversionSourceAttributesSequence = Sequence(
            [
                _item(
                    ReferencedSOPClassUID=slice_ds.SOPClassUID,
                    ReferencedSOPInstanceUID=slice_ds.SOPInstanceUID,
                )
            ]
        )
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    organisation = f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'dimensions:' + ds.SOPInstanceUID).int}"
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organisation)])
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=organisation,
                DimensionIndexPointer=Tag("StackID"),
                FunctionalGroupPointer=Tag("FrameContentSequence"),
            ),
            _item(
                DimensionOrganizationUID=organisation,
                DimensionIndexPointer=Tag("InStackPositionNumber"),
                FunctionalGroupPointer=Tag("FrameContentSequence"),
            ),
        ]
    )
    dtype = f"<{'i' if ds.PixelRepresentation == 1 else 'u'}{ds.BitsAllocated // 8}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    return ds


def _differs(ordered: list[tuple[str, Any]], names: tuple[str, ...]) -> bool:
    return len({tuple(str(ds.get(name, "")) for name in names) for _display, ds in ordered}) > 1


def _rescale(ds: Any) -> Any:
    return _item(
        RescaleIntercept=ds.get("RescaleIntercept", 0),
        RescaleSlope=ds.get("RescaleSlope", 1),
        RescaleType=ds.get("RescaleType", "HU") or "HU",
    )


def _window(ds: Any) -> Any:
    item = _item(WindowCenter=ds.WindowCenter, WindowWidth=ds.WindowWidth)
    if "WindowCenterWidthExplanation" in ds:
        item.WindowCenterWidthExplanation = ds.WindowCenterWidthExplanation
    return item


def _lossy(ds: Any, ordered: list[tuple[str, Any]]) -> None:
    """Lossy Image Compression 01 when any slice was lossy-compressed (in its file or before)."""
    methods: list[str] = []
    lossy = False
    for _display, slice_ds in ordered:
        syntax = str(slice_ds.file_meta.get("TransferSyntaxUID", ""))
        if syntax in read.LOSSY_SYNTAXES:
            lossy = True
            methods.append(read.LOSSY_SYNTAXES[syntax])
        if str(slice_ds.get("LossyImageCompression", "")) == "01":
            lossy = True
            declared = slice_ds.get("LossyImageCompressionMethod") or []
            methods.extend(str(m) for m in ([declared] if isinstance(declared, str) else declared))
    ds.LossyImageCompression = "01" if lossy else "00"
    if methods:
        ds.LossyImageCompressionMethod = sorted(set(methods))
