"""Every SELECT/UPDATE/DELETE the bridge runs (and the images' bulk INSERT), as functions that build a
statement and run nothing.

Keeping the statements here, apart from the code that executes them, lets one test compile each of them
for every supported dialect (SQLite, PostgreSQL, SQL Server) without a server of each kind at hand.

The statements every PMS request runs are built once as templates with bound parameters (`_template`)
and only given their values per call: building a SQLAlchemy statement costs several times more CPU than
running it on an indexed key, and a PMS launch runs a few of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any, Generic, NamedTuple, TypeVar

from sqlalchemy import Delete, Select, Update, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.sql.dml import ReturningInsert, ReturningUpdate

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

T = TypeVar("T")
R = TypeVar("R")


def _template(build: Callable[..., T]) -> Callable[..., T]:
    """Memoise a statement shape built with `bindparam`s (the builder's arguments choose the shape)."""
    return functools.lru_cache(maxsize=128)(build)


class Bound(NamedTuple, Generic[R]):
    """A memoised statement and its parameter values: `session.execute(*bound)` runs it.

    Executing one statement object with fresh values reuses its compiled form and cache key; cloning it
    with `.params()` for every call would recompute the cache key each time.
    """

    statement: Select[R]
    params: dict[str, Any]


@_template
def _link_by_key() -> Select[PmsLink]:
    return select(PmsLink).where(
        PmsLink.pms_system == bindparam("pms_system"),
        PmsLink.practice_key == bindparam("practice_key"),
        PmsLink.pms_id == bindparam("pms_id"),
    )


def link_by_key(pms_system: str, practice_key: str, pms_id: str) -> Bound[PmsLink]:
    """The link for an exact (system, practice, id) key: the identity rule when practice ids count."""
    return Bound(_link_by_key(), dict(pms_system=pms_system, practice_key=practice_key, pms_id=pms_id))


def unkeyed_link_for_practice(pms_system: str, practice_id: str, pms_id: str) -> Select[PmsLink]:
    """The link of one PMS id without a practice key that a request of this practice takes: one made
    under `ignore_practice_id` by a request of this practice (its practice recorded beside), or one made
    by a request that named no practice (no practice recorded either). The unique key on (system,
    practice key, id) leaves at most one; one recorded for another practice is that practice's."""
    return select(PmsLink).where(
        PmsLink.pms_system == pms_system,
        PmsLink.practice_key == "",
        PmsLink.practice_id.in_((practice_id, "")),
        PmsLink.pms_id == pms_id,
    )


def links_by_system_id(pms_system: str, pms_id: str) -> Select[PmsLink]:
    """Every link of one PMS id in any practice: the identity rule under `ignore_practice_id`."""
    return (
        select(PmsLink).where(PmsLink.pms_system == pms_system, PmsLink.pms_id == pms_id).order_by(PmsLink.id)
    )


def links_by_id_suffix(pms_system: str, suffix: str, practice_key: str | None) -> Select[PmsLink]:
    """Links of one PMS whose id ends with `suffix` (a PMS that sends only the end of its ids).

    `practice_key` None searches every practice (`ignore_practice_id`). The suffix is escaped, so a
    "%" or "_" in an id matches itself. Not indexed: a legacy mode for one PMS's links, not a hot path.
    """
    stmt = select(PmsLink).where(
        PmsLink.pms_system == pms_system, PmsLink.pms_id.endswith(suffix, autoescape=True)
    )
    if practice_key is not None:
        stmt = stmt.where(PmsLink.practice_key == practice_key)
    return stmt.order_by(PmsLink.id).limit(50)


@_template
def _links_of_patient() -> Select[PmsLink]:
    return select(PmsLink).where(PmsLink.patient_id == bindparam("patient_id")).order_by(PmsLink.id)


def links_of_patient(patient_id: int) -> Bound[PmsLink]:
    return Bound(_links_of_patient(), dict(patient_id=patient_id))


@_template
def _current_chart_alias() -> Select[ChartAlias]:
    return select(ChartAlias).where(
        ChartAlias.chart_number == bindparam("chart_number"), ChartAlias.retired_at.is_(None)
    )


def current_chart_alias(chart_number: str) -> Bound[ChartAlias]:
    """The alias currently holding a chart number (exact match, indexed)."""
    return Bound(_current_chart_alias(), dict(chart_number=chart_number))


@_template
def _current_chart_of_patient() -> Select[ChartAlias]:
    return select(ChartAlias).where(
        ChartAlias.patient_id == bindparam("patient_id"), ChartAlias.retired_at.is_(None)
    )


def current_chart_of_patient(patient_id: int) -> Bound[ChartAlias]:
    return Bound(_current_chart_of_patient(), dict(patient_id=patient_id))


def retire_chart_aliases(patient_id: int, at: datetime) -> Update:
    return (
        update(ChartAlias)
        .where(ChartAlias.patient_id == patient_id, ChartAlias.retired_at.is_(None))
        .values(retired_at=at)
    )


@_template
def _patient_by_id() -> Select[Patient]:
    return select(Patient).where(Patient.id == bindparam("patient_id"))


def patient_by_id(patient_id: int) -> Bound[Patient]:
    return Bound(_patient_by_id(), dict(patient_id=patient_id))


@_template
def _patient_for_update() -> Select[Patient]:
    return (
        select(Patient)
        .where(Patient.id == bindparam("patient_id"))
        # FOR NO KEY UPDATE: excludes other lockers and writers of the row, not the inserts of rows that
        # only reference it (an image, a link, an alias: their foreign key takes FOR KEY SHARE)
        .with_for_update(key_share=True)
        .with_hint(Patient, "WITH (UPDLOCK, ROWLOCK)", dialect_name="mssql")
        .execution_options(populate_existing=True)
    )


def patient_for_update(patient_id: int) -> Bound[Patient]:
    """One patient, its row locked until the transaction ends and its loaded attributes refreshed.

    What the identity rules take before they check or change a patient's links, demographics or chart
    numbers (see service._lock_patient): PostgreSQL FOR NO KEY UPDATE, SQL Server UPDLOCK. SQLite has
    one writer at a time (BEGIN IMMEDIATE), so there no lock clause is emitted. `populate_existing`
    overwrites what the session loaded before the lock was granted with the committed row.
    """
    return Bound(_patient_for_update(), dict(patient_id=patient_id))


@_template
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


@_template
def _patient_view_by_link_key() -> Select[Any]:
    return (
        select(
            *Patient.__table__.c,
            PmsLink.pms_system,
            PmsLink.pms_id,
            PmsLink.practice_id,
            PmsLink.protocol.label("link_protocol"),
            ChartAlias.chart_number,
        )
        .select_from(PmsLink)
        .join(Patient, Patient.id == PmsLink.patient_id)
        .outerjoin(ChartAlias, and_(ChartAlias.patient_id == Patient.id, ChartAlias.retired_at.is_(None)))
        .where(
            PmsLink.pms_system == bindparam("pms_system"),
            PmsLink.practice_key == bindparam("practice_key"),
            PmsLink.pms_id == bindparam("pms_id"),
        )
    )


def patient_view_by_link_key(pms_system: str, practice_key: str, pms_id: str) -> Bound[Any]:
    """The patient a PMS key names, with that link's columns and the current chart number, in one round
    trip: how an open of a known, unchanged patient is answered without a write transaction."""
    return Bound(
        _patient_view_by_link_key(), dict(pms_system=pms_system, practice_key=practice_key, pms_id=pms_id)
    )


@_template
def _patient_view_by_id() -> Select[Any]:
    return _patient_view_select().where(Patient.id == bindparam("patient_id"))


def patient_view_by_id(patient_id: int) -> Bound[Any]:
    return Bound(_patient_view_by_id(), dict(patient_id=patient_id))


@_template
def _search_patients(
    by_link: tuple[bool, bool], by_chart: bool, by_name: bool, by_birth: bool, limit: int
) -> Select[Any]:
    """One template per combination of filters (there are few); values are bound per call."""
    stmt = _patient_view_select().where(Patient.id > bindparam("after_id"))
    if any(by_link):
        link_filter = []
        if by_link[0]:
            link_filter.append(PmsLink.pms_id == bindparam("pms_id"))
        if by_link[1]:
            link_filter.append(PmsLink.pms_system == bindparam("pms_system"))
        stmt = stmt.where(Patient.id.in_(select(PmsLink.patient_id).where(and_(*link_filter))))
    if by_chart:
        stmt = stmt.where(
            Patient.id.in_(
                select(ChartAlias.patient_id).where(
                    ChartAlias.chart_number == bindparam("chart_number"), ChartAlias.retired_at.is_(None)
                )
            )
        )
    if by_name:
        stmt = stmt.where(Patient.name_key.like(bindparam("name_pattern"), escape="/"))
    if by_birth:
        stmt = stmt.where(Patient.birth_date == bindparam("birth_date"))
    return stmt.order_by(Patient.id).limit(limit)


def _prefix_pattern(prefix: str) -> str:
    """A LIKE pattern matching `prefix` literally at the start ("/" escapes the wildcards)."""
    return prefix.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


def search_patients(
    *,
    pms_id: str | None = None,
    pms_system: str | None = None,
    chart_number: str | None = None,
    name_prefix: str | None = None,
    birth_date: date | None = None,
    after_id: int = 0,
    limit: int = 50,
) -> Bound[Any]:
    """Patients (as view rows) matching every filter, in id order, after `after_id` (keyset paging).

    `name_prefix` is a folded prefix of "last first" (see `service.name_key`): a search aid for people,
    never an identity rule.
    """
    template = _search_patients(
        (pms_id is not None, pms_system is not None),
        chart_number is not None,
        bool(name_prefix),
        birth_date is not None,
        limit,
    )
    values: dict[str, Any] = {"after_id": after_id}
    for name, value in (
        ("pms_id", pms_id),
        ("pms_system", pms_system),
        ("chart_number", chart_number),
        ("name_pattern", _prefix_pattern(name_prefix) if name_prefix else None),
        ("birth_date", birth_date),
    ):
        if value is not None:
            values[name] = value
    return Bound(template, values)


@_template
def _image_view_select() -> Select[Any]:
    """Image columns with their series and study UIDs: what an image's view needs, as plain rows.

    The `attributes` JSON (render and export facts) is left out: lists of 100 images do not need it.
    """
    return (
        select(*(c for c in Image.__table__.c if c.name != "attributes"), Series.series_uid, Study.study_uid)
        .join(Series, Image.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
    )


@_template
def _images_of_patient(paged: bool, limit: int) -> Select[Any]:
    stmt = _image_view_select().where(Image.patient_id == bindparam("patient_id"))
    # A sort key without NULLs keeps the keyset condition portable (NULLS LAST is not on SQL Server).
    captured = func.coalesce(Image.captured_at, _NO_CAPTURE_TIME)
    if paged:
        pivot = bindparam("pivot", type_=Image.captured_at.type)
        stmt = stmt.where(or_(captured < pivot, and_(captured == pivot, Image.id < bindparam("last_id"))))
    return stmt.order_by(captured.desc(), Image.id.desc()).limit(limit)


def images_of_patient(
    patient_id: int, *, after: tuple[datetime | None, int] | None = None, limit: int = 100
) -> Bound[Any]:
    """A patient's images with their series and study, newest capture first, keyset-paged.

    Images without a capture time sort last. `after` is the (captured_at, id) of the last row seen.
    """
    if after is None:
        return Bound(_images_of_patient(False, limit), dict(patient_id=patient_id))
    last_captured, last_id = after
    return Bound(
        _images_of_patient(True, limit),
        dict(patient_id=patient_id, pivot=last_captured or _NO_CAPTURE_TIME, last_id=last_id),
    )


def image_by_id(image_id: int) -> Select[Image]:
    """One image as an ORM object, for changing it (PATCH /images/{id})."""
    return select(Image).where(Image.id == image_id)


@_template
def _image_view_by_id() -> Select[Any]:
    return _image_view_select().where(Image.id == bindparam("image_id"))


def image_view_by_id(image_id: int) -> Bound[Any]:
    return Bound(_image_view_by_id(), dict(image_id=image_id))


def images_by_ids(image_ids: list[int]) -> Select[Any]:
    return _image_view_select().where(Image.id.in_(image_ids))


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


def images_using_hashes(sha256s: list[str]) -> Select[str]:
    """The distinct file hashes among `sha256s` that some image row still references."""
    return select(Image.sha256).where(Image.sha256.in_(sha256s)).distinct()


def studies_by_uid(study_uids: list[str]) -> Select[Study]:
    """The stored studies among `study_uids` (an import batch's, looked up at once)."""
    return select(Study).where(Study.study_uid.in_(study_uids))


def series_by_uid(series_uids: list[str]) -> Select[Series]:
    """The stored series among `series_uids`."""
    return select(Series).where(Series.series_uid.in_(series_uids))


def insert_images() -> ReturningInsert[int]:
    """An ORM bulk INSERT of image rows (a list of dicts as its parameters), answering their ids in the
    order of the rows: a batch goes in without the unit of work's bookkeeping for each object, which was
    most of a DICOM import's database time (docs/dicom.md, "Performance"). SQLAlchemy sends it as one
    statement per batch where the backend can tell the ids' order, and as a statement per row where it
    cannot (SQLite)."""
    return insert(Image).returning(Image.id, sort_by_parameter_order=True)


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
    """Messages of one channel that are due: pending and past their next attempt time.

    Locked as they are read, skipping rows another daemon holds (PostgreSQL FOR UPDATE SKIP LOCKED, SQL
    Server READPAST): several daemons sharing one store never claim the same push. SQLite has one writer
    at a time (BEGIN IMMEDIATE), so there the lock clause is not needed and not emitted.
    """
    return (
        select(OutboxMessage)
        .where(
            OutboxMessage.channel == channel,
            OutboxMessage.state == "pending",
            OutboxMessage.next_attempt_at <= now,
        )
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def expired_outbox(channel: str, now: datetime, limit: int = 20) -> Select[OutboxMessage]:
    """Messages of one channel in "sending" whose claim has lapsed: the lease its daemon renews while it
    sends ran out (that daemon died or hangs), or a row from before leases (none recorded). Locked and
    skipped as `due_outbox` is, so one daemon at a time takes such a message over."""
    return (
        select(OutboxMessage)
        .where(
            OutboxMessage.channel == channel,
            OutboxMessage.state == "sending",
            or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now),
        )
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def extend_outbox_claims(
    message_ids: Sequence[int], instance: str, now: datetime, until: datetime
) -> ReturningUpdate[int]:
    """Extend a daemon's claims on messages `message_ids` to `until`, returning the ids extended: only
    claims still its own whose lease has not run out at `now`. One whose lease ran out may be taken
    over by another daemon any moment, so it counts as lost even while no one has taken it yet."""
    return (
        update(OutboxMessage)
        .where(
            OutboxMessage.id.in_(message_ids),
            OutboxMessage.state == "sending",
            OutboxMessage.claimed_by == instance,
            OutboxMessage.lease_until > now,
        )
        .values(lease_until=until)
        .returning(OutboxMessage.id)
        .execution_options(synchronize_session=False)
    )


def outbox_summary(include_done: bool) -> Select[str, str, int, datetime, datetime | None]:
    """Per channel and state: how many messages, the oldest one's creation, the oldest claim. Messages
    delivered ("done") are kept and only grow in number: left out unless asked for, so that what a
    metrics scrape runs stays on the state index's small part."""
    stmt = select(
        OutboxMessage.channel,
        OutboxMessage.state,
        func.count(),
        func.min(OutboxMessage.created_at),
        func.min(OutboxMessage.claimed_at),
    )
    if not include_done:
        stmt = stmt.where(OutboxMessage.state.in_(("pending", "sending", "failed")))
    return stmt.group_by(OutboxMessage.channel, OutboxMessage.state).order_by(
        OutboxMessage.channel, OutboxMessage.state
    )


def failed_outbox(channel: str | None, for_update: bool) -> Select[OutboxMessage]:
    """Messages given up on (all channels, or one); `for_update`: locked, for the admin's retry."""
    stmt = select(OutboxMessage).where(OutboxMessage.state == "failed")
    if channel is not None:
        stmt = stmt.where(OutboxMessage.channel == channel)
    stmt = stmt.order_by(OutboxMessage.id)
    return stmt.with_for_update() if for_update else stmt


def processed_file(watcher: str, content_sha256: str) -> Select[ProcessedFile]:
    return select(ProcessedFile).where(
        ProcessedFile.watcher == watcher, ProcessedFile.content_sha256 == content_sha256
    )


def forget_processed_files(watcher: str, before: datetime) -> Delete:
    """Processed-file records old enough that the PMS has long deleted the files."""
    return delete(ProcessedFile).where(ProcessedFile.watcher == watcher, ProcessedFile.processed_at < before)


def image_ids_of_patient(patient_id: int) -> Select[int]:
    return select(Image.id).where(Image.patient_id == patient_id).order_by(Image.id)


def highest_image_id() -> Select[int]:
    return select(func.max(Image.id))


def image_patients_after(image_id: int, limit: int) -> Select[int, int]:
    """Images added after `image_id` (ids grow), oldest first: the announcing worker's look."""
    return select(Image.id, Image.patient_id).where(Image.id > image_id).order_by(Image.id).limit(limit)


def image_patients_by_ids(image_ids: list[int]) -> Select[int, int]:
    return select(Image.id, Image.patient_id).where(Image.id.in_(image_ids)).order_by(Image.id)
