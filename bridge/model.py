"""Domain types shared by every layer: what a PMS asks for and what the bridge answers.

Protocol modules build a `PatientRequest` from bytes and render an `Outcome` back into bytes; the service
turns one into the other. These are plain frozen dataclasses (no ORM objects), so a protocol module can be
tested without a database and an outcome can cross a thread or process boundary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any


class Sex(enum.StrEnum):
    """Patient sex as the API reports it: male, female, other (diverse), unknown."""

    MALE = "M"
    FEMALE = "F"
    OTHER = "O"
    UNKNOWN = "U"


class Action(enum.StrEnum):
    """What a PMS asks the bridge to do with a patient."""

    OPEN = "open"  # create if unknown (PMS launch), update demographics, show the patient
    UPDATE = "update"  # update a known patient only; unknown is an error (OPP UPDATE)
    CREATE_OR_UPDATE = "create_or_update"  # the front desk's "+" (REST POST /patients)
    ACQUIRE = "acquire"  # open and request an acquisition
    LIST_IMAGES = "list_images"  # the patient's images (VDDS MMOINFEXPORT, OPP VIEW_DATA)
    VIEW_IMAGE = "view_image"  # show one image (VDDS MMOVIEW)
    EXPORT_IMAGES = "export_images"  # file copies (VDDS MMOEXPORT)
    IMPORT = "import"  # images arriving without a PMS (DICOM media): a new patient comes only with its images


class IdKind(enum.StrEnum):
    """Which of its ids a PMS sends: its immutable internal id, or the editable chart number.

    PMS_ID_SUFFIX: only the last `PatientRequest.id_suffix_length` characters of the internal id
    (Patterson's legacy bridge sends the last 5); matched against the ends of the known ids.
    """

    PMS_ID = "pms_id"
    CHART_NUMBER = "chart_number"
    PMS_ID_SUFFIX = "pms_id_suffix"


class Status(enum.StrEnum):
    """How a request ended. Protocols map these onto their own codes (ERRORLEVEL, HTTP status ...)."""

    OK = "ok"
    CREATED = "created"
    UPDATED = "updated"
    PARTIAL = "partial"  # some of the requested images were found, not all
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    FORBIDDEN = "forbidden"
    INVALID = "invalid"
    ERROR = "error"

    @property
    def ok(self) -> bool:
        return self in (Status.OK, Status.CREATED, Status.UPDATED)


class Category(enum.StrEnum):
    """Image category as the API reports it."""

    INTRAORAL_XRAY = "intraoral-xray"
    EXTRAORAL_XRAY = "extraoral-xray"
    PANORAMIC = "panoramic"
    CEPHALOMETRIC = "cephalometric"
    CBCT = "cbct"
    PHOTO = "photo"
    DOCUMENT = "document"


@dataclass(frozen=True)
class Demographics:
    """What a PMS tells about a patient. Empty strings and None mean "not sent"."""

    last_name: str = ""
    first_name: str = ""
    middle_name: str = ""
    title: str = ""
    birth_date: date | None = None
    sex: Sex = Sex.UNKNOWN
    street: str = ""
    city: str = ""
    postal_code: str = ""
    phone: str = ""
    email: str = ""


@dataclass(frozen=True)
class Origin:
    """Who sent a request, for the audit log: protocol, transport, workstation and API token (if any)."""

    protocol: str
    transport: str = "api"  # cli | folder | http | api | import
    workstation: str = ""
    actor: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class PatientRequest:
    """One PMS request, already parsed out of its protocol.

    `pms_system` names the PMS (a VDDS PVS section, an OPP software name, "dentrix" ...); with
    `practice_id` and `pms_id` it keys the patient. When `id_kind` is CHART_NUMBER, `pms_id` is empty and
    `chart_number` is the key.
    """

    action: Action
    origin: Origin
    pms_system: str
    pms_id: str = ""
    practice_id: str = ""
    id_kind: IdKind = IdKind.PMS_ID
    chart_number: str = ""
    id_suffix_length: int = 0  # PMS_ID_SUFFIX: how many trailing characters of its id the PMS keeps
    demographics: Demographics = field(default_factory=Demographics)
    silent: bool = False  # no UI event (OPP silent="YES")
    image_refs: tuple[str, ...] = ()  # image ids the PMS refers to (MMOIDs)
    export_format: str = ""  # JPG, PNG, TIF, DCM for EXPORT_IMAGES


@dataclass(frozen=True)
class PatientView:
    """A stored patient as every layer above the store sees it."""

    id: int
    last_name: str
    first_name: str
    middle_name: str
    title: str
    birth_date: date | None
    sex: Sex
    chart_number: str | None
    pms_system: str | None = None
    pms_id: str | None = None
    practice_id: str | None = None
    street: str = ""
    city: str = ""
    postal_code: str = ""
    phone: str = ""
    email: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pms_id": self.pms_id,
            "pms_system": self.pms_system,
            "practice_id": self.practice_id,
            "chart_number": self.chart_number,
            "last_name": self.last_name,
            "first_name": self.first_name,
            "middle_name": self.middle_name,
            "title": self.title,
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
            "sex": self.sex.value,
            "street": self.street,
            "city": self.city,
            "postal_code": self.postal_code,
            "phone": self.phone,
            "email": self.email,
        }


@dataclass(frozen=True)
class ImageView:
    """A stored image's metadata (never its pixels)."""

    id: int
    patient_id: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    captured_at: datetime | None
    category: Category
    tooth_numbers: tuple[int, ...]
    rotation: int
    mirrored: bool
    width: int
    height: int
    bits_stored: int
    color: bool
    sha256: str
    media_type: str
    file_ext: str
    device: str = ""
    comment: str = ""
    frames: int = 1
    imported_at: datetime | None = None  # UTC; when the capture time is unknown, what a PMS dates it by

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "captured_at": self.captured_at.isoformat() if self.captured_at else None,
            "category": self.category.value,
            "tooth_numbers": list(self.tooth_numbers),
            "rotation": self.rotation,
            "mirrored": self.mirrored,
            "width": self.width,
            "height": self.height,
            "bits_stored": self.bits_stored,
            "color": self.color,
            "sha256": self.sha256,
            "media_type": self.media_type,
            "device": self.device,
            "comment": self.comment,
            "frames": self.frames,
        }


@dataclass(frozen=True)
class ImageDetails:
    """An image with what an export needs beyond its view: its stored facts, its study and its series."""

    image: ImageView
    attributes: dict[str, Any]
    imported_at: datetime
    study_description: str
    study_date: datetime | None
    accession_number: str
    series_number: int | None
    series_modality: str
    series_description: str


@dataclass(frozen=True)
class Outcome:
    """What the service answers: a status, a message a human can read, and the data for the reply."""

    status: Status
    message: str = ""
    patient: PatientView | None = None
    images: tuple[ImageView, ...] = ()
    missing_refs: tuple[str, ...] = ()  # image refs that were asked for and not found
    conflict_id: int | None = None
    # INVALID: the request field at fault ("birth_date", "pms_id", "last_name" ...), for the answers that
    # name one (the REST API's 422 `field`); "" when the refusal is about no single field.
    field: str = ""
    viewer_url: str = ""  # where a viewer should show the patient or image (open_patient_in/open_image_as)
    # A pure read: while the store is unchanged, an identical request (origin aside) gets this same outcome,
    # and `BridgeService.repeat` records and announces it again without asking the store.
    repeatable: bool = False


@dataclass(frozen=True)
class NewImage:
    """An image to add to a patient: its file is already in the file store under `sha256`.

    UIDs left empty are generated; `study_uid` groups one acquisition or one imported study.
    """

    sha256: str
    file_ext: str
    media_type: str
    size_bytes: int
    width: int
    height: int
    bits_stored: int
    color: bool
    category: Category
    frames: int = 1
    tooth_numbers: tuple[int, ...] = ()
    rotation: int = 0
    mirrored: bool = False
    captured_at: datetime | None = None
    device: str = ""
    comment: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uid: str = ""
    modality: str = ""
    study_description: str = ""
    series_description: str = ""
    series_number: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
