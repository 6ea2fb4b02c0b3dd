"""Every SELECT/UPDATE/DELETE the bridge runs, as functions that build a statement and run nothing.

Keeping the statements here, apart from the code that executes them, lets one test compile each of them
for every supported dialect (SQLite, PostgreSQL, SQL Server) without a server of each kind at hand.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import Delete, Select, Update, and_, delete, func, or_, select, update

from bridge.store.models import (
    AuditEntry,
    ChartAlias,
    Conflict,
    Image,
    OutboxMessage,
    Patient,
    PmsLink,
    ProcessedFile,
    Series,
    Study,
)

# Stands in for "no capture time" in the image order; earlier than any real capture, and inside the range
# of every dialect's datetime type (SQL Server's DATETIME starts in 1753).
_NO_CAPTURE_TIME = datetime(1900, 1, 1)


def link_by_key(pms_system: str, practice_key: str, pms_id: str) -> Select[PmsLink]:
    """The link for an exact (system, practice, id) key: the identity rule when practice ids count."""
    return select(PmsLink).where(
        PmsLink.pms_system == pms_system, PmsLink.practice_key == practice_key, PmsLink.pms_id == pms_id
    )


def links_by_system_id(pms_system: str, pms_id: str) -> Select[PmsLink]:
    """Every link of one PMS id in any practice: the identity rule under `ignore_practice_id`."""
    return (
        select(PmsLink).where(PmsLink.pms_system == pms_system, PmsLink.pms_id == pms_id).order_by(PmsLink.id)
    )


def links_of_patient(patient_id: int) -> Select[PmsLink]:
    return select(PmsLink).where(PmsLink.patient_id == patient_id).order_by(PmsLink.id)


def current_chart_alias(chart_number: str) -> Select[ChartAlias]:
    """The alias currently holding a chart number (exact match, indexed)."""
    return select(ChartAlias).where(ChartAlias.chart_number == chart_number, ChartAlias.retired_at.is_(None))


def current_chart_of_patient(patient_id: int) -> Select[ChartAlias]:
    return select(ChartAlias).where(ChartAlias.patient_id == patient_id, ChartAlias.retired_at.is_(None))


def retire_chart_aliases(patient_id: int, at: datetime) -> Update:
    return (
        update(ChartAlias)
        .where(ChartAlias.patient_id == patient_id, ChartAlias.retired_at.is_(None))
        .values(retired_at=at)
    )


def patient_by_id(patient_id: int) -> Select[Patient]:
    return select(Patient).where(Patient.id == patient_id)


def _patient_view_select() -> Select[Any]:
    """Patient columns with the patient's first PMS link and current chart number, in one round trip.

    Reads (searches, the API, protocol answers) are served from plain rows of this statement rather than
    ORM objects and three queries: a PMS asks for a patient on every launch.
    """
    first_link = (
        select(func.min(PmsLink.id))
        .where(PmsLink.patient_id == Patient.id)
        .correlate(Patient)
        .scalar_subquery()
    )
    return (
        select(
            *Patient.__table__.c,
            PmsLink.pms_system,
            PmsLink.pms_id,
            PmsLink.practice_id,
            ChartAlias.chart_number,
        )
        .select_from(Patient)
        .outerjoin(PmsLink, PmsLink.id == first_link)
        .outerjoin(ChartAlias, and_(ChartAlias.patient_id == Patient.id, ChartAlias.retired_at.is_(None)))
    )


def patient_view_by_id(patient_id: int) -> Select[Any]:
    return _patient_view_select().where(Patient.id == patient_id)


def search_patients(
    *,
    pms_id: str | None = None,
    pms_system: str | None = None,
    chart_number: str | None = None,
    name_prefix: str | None = None,
    birth_date: date | None = None,
    after_id: int = 0,
    limit: int = 50,
) -> Select[Any]:
    """Patients (as view rows) matching every filter, in id order, after `after_id` (keyset paging).

    `name_prefix` is a folded prefix of "last first" (see `service.name_key`): a search aid for people,
    never an identity rule.
    """
    stmt = _patient_view_select().where(Patient.id > after_id)
    if pms_id is not None or pms_system is not None:
        link_filter = []
        if pms_id is not None:
            link_filter.append(PmsLink.pms_id == pms_id)
        if pms_system is not None:
            link_filter.append(PmsLink.pms_system == pms_system)
        stmt = stmt.where(Patient.id.in_(select(PmsLink.patient_id).where(and_(*link_filter))))
    if chart_number is not None:
        stmt = stmt.where(
            Patient.id.in_(
                select(ChartAlias.patient_id).where(
                    ChartAlias.chart_number == chart_number, ChartAlias.retired_at.is_(None)
                )
            )
        )
    if name_prefix:
        stmt = stmt.where(Patient.name_key.startswith(name_prefix, autoescape=True))
    if birth_date is not None:
        stmt = stmt.where(Patient.birth_date == birth_date)
    return stmt.order_by(Patient.id).limit(limit)


def _image_view_select() -> Select[Any]:
    """Image columns with their series and study UIDs: what an image's view needs, as plain rows.

    The `attributes` JSON (render and export facts) is left out: lists of 100 images do not need it.
    """
    return (
        select(*(c for c in Image.__table__.c if c.name != "attributes"), Series.series_uid, Study.study_uid)
        .join(Series, Image.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
    )


def images_of_patient(
    patient_id: int, *, after: tuple[datetime | None, int] | None = None, limit: int = 100
) -> Select[Any]:
    """A patient's images with their series and study, newest capture first, keyset-paged.

    Images without a capture time sort last. `after` is the (captured_at, id) of the last row seen.
    """
    stmt = _image_view_select().where(Image.patient_id == patient_id)
    # A sort key without NULLs keeps the keyset condition portable (NULLS LAST is not on SQL Server).
    captured = func.coalesce(Image.captured_at, _NO_CAPTURE_TIME)
    if after is not None:
        last_captured, last_id = after
        pivot = last_captured or _NO_CAPTURE_TIME
        stmt = stmt.where(or_(captured < pivot, and_(captured == pivot, Image.id < last_id)))
    return stmt.order_by(captured.desc(), Image.id.desc()).limit(limit)


def image_by_id(image_id: int) -> Select[Image]:
    """One image as an ORM object, for changing it (PATCH /images/{id})."""
    return select(Image).where(Image.id == image_id)


def image_view_by_id(image_id: int) -> Select[Any]:
    return _image_view_select().where(Image.id == image_id)


def images_by_ids(image_ids: list[int]) -> Select[Any]:
    return _image_view_select().where(Image.id.in_(image_ids))


def image_by_sop_uid(sop_instance_uid: str) -> Select[Image]:
    return select(Image).where(Image.sop_instance_uid == sop_instance_uid)


def images_by_sop_uids(sop_instance_uids: list[str]) -> Select[str, int, str]:
    """(SOP Instance UID, patient id, sha256) of the stored images among these UIDs (import's duplicates)."""
    return select(Image.sop_instance_uid, Image.patient_id, Image.sha256).where(
        Image.sop_instance_uid.in_(sop_instance_uids)
    )


def image_details_of_patient(patient_id: int) -> Select[Any]:
    """A patient's images with their stored attributes, study and series facts: what an export needs."""
    return (
        select(
            *Image.__table__.c,
            Series.series_uid,
            Series.number.label("series_number"),
            Series.modality.label("series_modality"),
            Series.description.label("series_description"),
            Study.study_uid,
            Study.description.label("study_description"),
            Study.study_date,
            Study.accession_number,
        )
        .join(Series, Image.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Image.patient_id == patient_id)
        .order_by(Study.id, Series.id, Image.id)
    )


def image_by_sha256(patient_id: int, sha256: str) -> Select[Image]:
    return select(Image).where(Image.patient_id == patient_id, Image.sha256 == sha256)


def images_using_hashes(sha256s: list[str]) -> Select[str]:
    """The distinct file hashes among `sha256s` that some image row still references."""
    return select(Image.sha256).where(Image.sha256.in_(sha256s)).distinct()


def study_by_uid(study_uid: str) -> Select[Study]:
    return select(Study).where(Study.study_uid == study_uid)


def series_by_uid(series_uid: str) -> Select[Series]:
    return select(Series).where(Series.series_uid == series_uid)


def all_image_hashes(after_id: int = 0, limit: int = 1000) -> Select[int, str, str]:
    """(id, sha256, file_ext) of every image, keyset-paged: what `reconcile` re-checks on disk."""
    return (
        select(Image.id, Image.sha256, Image.file_ext)
        .where(Image.id > after_id)
        .order_by(Image.id)
        .limit(limit)
    )


def open_conflict_like(
    kind: str, pms_system: str, practice_id: str, pms_id: str, chart_number: str
) -> Select[Conflict]:
    """An unresolved conflict of the same kind and key: a repeated request does not pile up duplicates."""
    return select(Conflict).where(
        Conflict.kind == kind,
        Conflict.pms_system == pms_system,
        Conflict.practice_id == practice_id,
        Conflict.pms_id == pms_id,
        Conflict.chart_number == chart_number,
        Conflict.resolved_at.is_(None),
    )


def conflicts(*, open_only: bool = True, after_id: int = 0, limit: int = 50) -> Select[Conflict]:
    stmt = select(Conflict).where(Conflict.id > after_id)
    if open_only:
        stmt = stmt.where(Conflict.resolved_at.is_(None))
    return stmt.order_by(Conflict.id).limit(limit)


def conflict_by_id(conflict_id: int) -> Select[Conflict]:
    return select(Conflict).where(Conflict.id == conflict_id)


def audit_entries(
    *, patient_id: int | None = None, after_id: int = 0, limit: int = 100
) -> Select[AuditEntry]:
    stmt = select(AuditEntry).where(AuditEntry.id > after_id)
    if patient_id is not None:
        stmt = stmt.where(AuditEntry.patient_id == patient_id)
    return stmt.order_by(AuditEntry.id).limit(limit)


def due_outbox(channel: str, now: datetime, limit: int = 20) -> Select[OutboxMessage]:
    """Messages of one channel that are due: pending and past their next attempt time."""
    return (
        select(OutboxMessage)
        .where(
            OutboxMessage.channel == channel,
            OutboxMessage.state == "pending",
            OutboxMessage.next_attempt_at <= now,
        )
        .order_by(OutboxMessage.id)
        .limit(limit)
    )


def outbox_in_state(channel: str, state: str) -> Select[OutboxMessage]:
    return (
        select(OutboxMessage)
        .where(OutboxMessage.channel == channel, OutboxMessage.state == state)
        .order_by(OutboxMessage.id)
    )


def outbox_by_key(key: str) -> Select[OutboxMessage]:
    return select(OutboxMessage).where(OutboxMessage.key == key)


def processed_file(watcher: str, content_sha256: str) -> Select[ProcessedFile]:
    return select(ProcessedFile).where(
        ProcessedFile.watcher == watcher, ProcessedFile.content_sha256 == content_sha256
    )


def forget_processed_files(watcher: str, before: datetime) -> Delete:
    """Processed-file records old enough that the PMS has long deleted the files."""
    return delete(ProcessedFile).where(ProcessedFile.watcher == watcher, ProcessedFile.processed_at < before)


def count_patients() -> Select[int]:
    return select(func.count()).select_from(Patient)


def count_images() -> Select[int]:
    return select(func.count()).select_from(Image)
