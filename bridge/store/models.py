"""SQLAlchemy models of the store. Schema changes go through Alembic (`bridge/store/migrations`).

One code path serves SQLite, PostgreSQL and MS SQL Server, so the types are portable ones: strings have
lengths (SQL Server indexes need them), JSON is SQLAlchemy's JSON type, and partial unique indexes are
declared for all three dialects (SQL Server's unique constraints treat NULLs as equal).
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Unicode,
    UnicodeText,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from bridge.store.types import UtcDateTime

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT primary keys on PostgreSQL and SQL Server, INTEGER on SQLite (where only INTEGER autoincrements).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    """A person in the store. Demographics only; how PMSs know the patient is in `PmsLink`."""

    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    last_name: Mapped[str] = mapped_column(Unicode(120), default="")
    first_name: Mapped[str] = mapped_column(Unicode(120), default="")
    middle_name: Mapped[str] = mapped_column(Unicode(120), default="")
    title: Mapped[str] = mapped_column(Unicode(40), default="")
    # Case- and accent-folded "last first", for name search; never used to match a PMS request.
    name_key: Mapped[str] = mapped_column(Unicode(250), default="", index=True)
    birth_date: Mapped[date | None] = mapped_column(Date, nullable=True)
    sex: Mapped[str] = mapped_column(Unicode(1), default="U")
    street: Mapped[str] = mapped_column(Unicode(200), default="")
    city: Mapped[str] = mapped_column(Unicode(120), default="")
    postal_code: Mapped[str] = mapped_column(Unicode(20), default="")
    phone: Mapped[str] = mapped_column(Unicode(60), default="")
    email: Mapped[str] = mapped_column(Unicode(200), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    links: Mapped[list[PmsLink]] = relationship(back_populates="patient", order_by="PmsLink.id")
    chart_aliases: Mapped[list[ChartAlias]] = relationship(back_populates="patient", order_by="ChartAlias.id")


class PmsLink(Base):
    """How one PMS (system + practice) knows a patient: its immutable patient id.

    `practice_key` is the practice id when practice ids count, and "" when the link was made under
    `ignore_practice_id`; the unique constraint on (pms_system, practice_key, pms_id) is what makes two
    concurrent requests for one new patient create exactly one.
    """

    __tablename__ = "pms_links"
    __table_args__ = (
        UniqueConstraint("pms_system", "practice_key", "pms_id", name="uq_pms_links_key"),
        # searches by id alone and the ignore_practice_id rule do not know the practice
        Index("ix_pms_links_system_id", "pms_system", "pms_id"),
        Index("ix_pms_links_pms_id", "pms_id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    pms_system: Mapped[str] = mapped_column(Unicode(100))
    practice_key: Mapped[str] = mapped_column(Unicode(100), default="")
    practice_id: Mapped[str] = mapped_column(Unicode(100), default="")
    pms_id: Mapped[str] = mapped_column(Unicode(100))
    # The protocol that last used this link (vdds, opp, dexis ...): decides which pushes the PMS gets.
    protocol: Mapped[str] = mapped_column(Unicode(40), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime())

    patient: Mapped[Patient] = relationship(back_populates="links")


class ChartAlias(Base):
    """A chart number of a patient. The current one has `retired_at` NULL, is unique store-wide and is
    the patient's only current one.

    Chart numbers are editable in the PMS (Dentrix), so they are aliases: a renumbering retires the old
    row and adds a new one; the patient stays linked by the PMS's immutable id.
    """

    __tablename__ = "chart_aliases"
    __table_args__ = (
        Index(
            "uq_chart_aliases_current",
            "chart_number",
            unique=True,
            sqlite_where=text("retired_at IS NULL"),
            postgresql_where=text("retired_at IS NULL"),
            mssql_where=text("retired_at IS NULL"),
        ),
        # at most one current chart number per patient: a renumbering that lost a race (the service locks
        # the patient, so it should not) fails on this instead of leaving two, and is retried
        Index(
            "uq_chart_aliases_current_patient",
            "patient_id",
            unique=True,
            sqlite_where=text("retired_at IS NULL"),
            postgresql_where=text("retired_at IS NULL"),
            mssql_where=text("retired_at IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    chart_number: Mapped[str] = mapped_column(Unicode(60), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    patient: Mapped[Patient] = relationship(back_populates="chart_aliases")


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    study_uid: Mapped[str] = mapped_column(Unicode(64), unique=True)
    description: Mapped[str] = mapped_column(Unicode(200), default="")
    study_date: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)  # practice wall clock
    accession_number: Mapped[str] = mapped_column(Unicode(40), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(Unicode(64), unique=True)
    modality: Mapped[str] = mapped_column(Unicode(16), default="")
    description: Mapped[str] = mapped_column(Unicode(200), default="")
    number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Image(Base):
    """One image: metadata only. The pixels are the content-addressed file named by `sha256`."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_patient_captured", "patient_id", "captured_at", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(Unicode(64), unique=True)
    sha256: Mapped[str] = mapped_column(Unicode(64), index=True)
    file_ext: Mapped[str] = mapped_column(Unicode(10))
    media_type: Mapped[str] = mapped_column(Unicode(60))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    category: Mapped[str] = mapped_column(Unicode(30))
    tooth_numbers: Mapped[list[int]] = mapped_column(JSON, default=list)
    rotation: Mapped[int] = mapped_column(Integer, default=0)
    mirrored: Mapped[bool] = mapped_column(Boolean, default=False)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    bits_stored: Mapped[int] = mapped_column(Integer)
    color: Mapped[bool] = mapped_column(Boolean)
    # Capture time as the practice's wall clock (DICOM and PMS times carry no zone), never import time.
    captured_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    imported_at: Mapped[datetime] = mapped_column(UtcDateTime())
    device: Mapped[str] = mapped_column(Unicode(200), default="")
    comment: Mapped[str] = mapped_column(Unicode(500), default="")
    # Display and source facts the renderer and DICOM export need (window, photometric, source tags).
    attributes: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)


class Annotation(Base):
    """Graphical annotations, kept apart from the pixels (which are never modified)."""

    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(Unicode(40))
    data: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    author: Mapped[str] = mapped_column(Unicode(120), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Conflict(Base):
    """A PMS request the bridge refused because the identity did not add up; shown in the API."""

    __tablename__ = "conflicts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(Unicode(40))
    pms_system: Mapped[str] = mapped_column(Unicode(100), default="")
    practice_id: Mapped[str] = mapped_column(Unicode(100), default="")
    pms_id: Mapped[str] = mapped_column(Unicode(100), default="")
    chart_number: Mapped[str] = mapped_column(Unicode(60), default="")
    patient_id: Mapped[int | None] = mapped_column(
        ForeignKey("patients.id", ondelete="SET NULL"), nullable=True
    )
    other_patient_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    detail: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    origin: Mapped[str] = mapped_column(Unicode(200), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    resolution: Mapped[str] = mapped_column(Unicode(40), default="")


class AuditEntry(Base):
    """Who read or changed what: protocol, transport, workstation, token; never the patient data itself."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    action: Mapped[str] = mapped_column(Unicode(40))
    protocol: Mapped[str] = mapped_column(Unicode(40), default="")
    transport: Mapped[str] = mapped_column(Unicode(20), default="")
    workstation: Mapped[str] = mapped_column(Unicode(120), default="")
    actor: Mapped[str] = mapped_column(Unicode(120), default="")
    request_id: Mapped[str] = mapped_column(Unicode(40), default="")
    patient_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    image_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    detail: Mapped[str] = mapped_column(UnicodeText, default="")


class OutboxMessage(Base):
    """A message to a PMS (a push of new images) that must survive restarts and be sent once.

    Written in the same transaction as the images it announces; a channel worker sends it and marks it
    done. `key` makes enqueueing idempotent. A worker claiming it ("sending") records its daemon's
    instance id and a lease it renews while the send runs: several daemons share one store, so a message
    in "sending" is another daemon's business until its lease has expired (bridge/outbox.py).
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "state", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    channel: Mapped[str] = mapped_column(Unicode(60))
    key: Mapped[str] = mapped_column(Unicode(200), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    payload: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(Unicode(12), default="pending")  # pending | sending | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_error: Mapped[str] = mapped_column(Unicode(1000), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    done_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(Unicode(40), nullable=True)  # the last claimer
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)  # while "sending"


class ProcessedFile(Base):
    """A file a watched folder has handled, by content hash, so each file is handled once."""

    __tablename__ = "processed_files"
    __table_args__ = (UniqueConstraint("watcher", "content_sha256", name="uq_processed_files_key"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    watcher: Mapped[str] = mapped_column(Unicode(60))
    content_sha256: Mapped[str] = mapped_column(Unicode(64))
    path: Mapped[str] = mapped_column(Unicode(1000))
    processed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    result: Mapped[str] = mapped_column(Unicode(200), default="")


class StoreGeneration(Base):
    """One row whose value triggers move on every change to a table memoised reads depend on (SQLite;
    PostgreSQL notifies instead). See bridge/store/changes.py and migration 0003."""

    __tablename__ = "store_generation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
