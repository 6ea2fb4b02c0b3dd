"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('action', sa.Unicode(length=40), nullable=False),
    sa.Column('protocol', sa.Unicode(length=40), nullable=False),
    sa.Column('transport', sa.Unicode(length=20), nullable=False),
    sa.Column('workstation', sa.Unicode(length=120), nullable=False),
    sa.Column('actor', sa.Unicode(length=120), nullable=False),
    sa.Column('request_id', sa.Unicode(length=40), nullable=False),
    sa.Column('patient_id', sa.BigInteger(), nullable=True),
    sa.Column('image_id', sa.BigInteger(), nullable=True),
    sa.Column('detail', sa.UnicodeText(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_patient_id'), ['patient_id'], unique=False)

    op.create_table('patients',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('last_name', sa.Unicode(length=120), nullable=False),
    sa.Column('first_name', sa.Unicode(length=120), nullable=False),
    sa.Column('middle_name', sa.Unicode(length=120), nullable=False),
    sa.Column('title', sa.Unicode(length=40), nullable=False),
    sa.Column('name_key', sa.Unicode(length=250), nullable=False),
    sa.Column('birth_date', sa.Date(), nullable=True),
    sa.Column('sex', sa.Unicode(length=1), nullable=False),
    sa.Column('street', sa.Unicode(length=200), nullable=False),
    sa.Column('city', sa.Unicode(length=120), nullable=False),
    sa.Column('postal_code', sa.Unicode(length=20), nullable=False),
    sa.Column('phone', sa.Unicode(length=60), nullable=False),
    sa.Column('email', sa.Unicode(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patients'))
    )
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patients_name_key'), ['name_key'], unique=False)

    op.create_table('processed_files',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('watcher', sa.Unicode(length=60), nullable=False),
    sa.Column('content_sha256', sa.Unicode(length=64), nullable=False),
    sa.Column('path', sa.Unicode(length=1000), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('result', sa.Unicode(length=200), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_processed_files')),
    sa.UniqueConstraint('watcher', 'content_sha256', name='uq_processed_files_key')
    )
    op.create_table('chart_aliases',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('chart_number', sa.Unicode(length=60), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_chart_aliases_patient_id_patients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_chart_aliases'))
    )
    with op.batch_alter_table('chart_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_chart_aliases_chart_number'), ['chart_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_chart_aliases_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index('uq_chart_aliases_current', ['chart_number'], unique=True, sqlite_where=sa.text('retired_at IS NULL'), postgresql_where=sa.text('retired_at IS NULL'), mssql_where=sa.text('retired_at IS NULL'))

    op.create_table('conflicts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.Unicode(length=40), nullable=False),
    sa.Column('pms_system', sa.Unicode(length=100), nullable=False),
    sa.Column('practice_id', sa.Unicode(length=100), nullable=False),
    sa.Column('pms_id', sa.Unicode(length=100), nullable=False),
    sa.Column('chart_number', sa.Unicode(length=60), nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('other_patient_id', sa.BigInteger(), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('origin', sa.Unicode(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('resolution', sa.Unicode(length=40), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_conflicts_patient_id_patients'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conflicts'))
    )
    with op.batch_alter_table('conflicts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conflicts_created_at'), ['created_at'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('channel', sa.Unicode(length=60), nullable=False),
    sa.Column('key', sa.Unicode(length=200), nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('state', sa.Unicode(length=12), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Unicode(length=1000), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_outbox_patient_id_patients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    sa.UniqueConstraint('key', name=op.f('uq_outbox_key'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_patient_id'), ['patient_id'], unique=False)

    op.create_table('pms_links',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('pms_system', sa.Unicode(length=100), nullable=False),
    sa.Column('practice_key', sa.Unicode(length=100), nullable=False),
    sa.Column('practice_id', sa.Unicode(length=100), nullable=False),
    sa.Column('pms_id', sa.Unicode(length=100), nullable=False),
    sa.Column('protocol', sa.Unicode(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_pms_links_patient_id_patients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pms_links')),
    sa.UniqueConstraint('pms_system', 'practice_key', 'pms_id', name='uq_pms_links_key')
    )
    with op.batch_alter_table('pms_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pms_links_patient_id'), ['patient_id'], unique=False)

    op.create_table('studies',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('study_uid', sa.Unicode(length=64), nullable=False),
    sa.Column('description', sa.Unicode(length=200), nullable=False),
    sa.Column('study_date', sa.DateTime(), nullable=True),
    sa.Column('accession_number', sa.Unicode(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_studies_patient_id_patients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_studies')),
    sa.UniqueConstraint('study_uid', name=op.f('uq_studies_study_uid'))
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_studies_patient_id'), ['patient_id'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('study_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('series_uid', sa.Unicode(length=64), nullable=False),
    sa.Column('modality', sa.Unicode(length=16), nullable=False),
    sa.Column('description', sa.Unicode(length=200), nullable=False),
    sa.Column('number', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_series_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_series')),
    sa.UniqueConstraint('series_uid', name=op.f('uq_series_series_uid'))
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_study_id'), ['study_id'], unique=False)

    op.create_table('images',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('series_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sop_instance_uid', sa.Unicode(length=64), nullable=False),
    sa.Column('sha256', sa.Unicode(length=64), nullable=False),
    sa.Column('file_ext', sa.Unicode(length=10), nullable=False),
    sa.Column('media_type', sa.Unicode(length=60), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('category', sa.Unicode(length=30), nullable=False),
    sa.Column('tooth_numbers', sa.JSON(), nullable=False),
    sa.Column('rotation', sa.Integer(), nullable=False),
    sa.Column('mirrored', sa.Boolean(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('bits_stored', sa.Integer(), nullable=False),
    sa.Column('color', sa.Boolean(), nullable=False),
    sa.Column('captured_at', sa.DateTime(), nullable=True),
    sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('device', sa.Unicode(length=200), nullable=False),
    sa.Column('comment', sa.Unicode(length=500), nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_images_patient_id_patients'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], name=op.f('fk_images_series_id_series'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_images_sop_instance_uid'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_patient_captured', ['patient_id', 'captured_at', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_series_id'), ['series_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_sha256'), ['sha256'], unique=False)

    op.create_table('annotations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('image_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.Unicode(length=40), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('author', sa.Unicode(length=120), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_annotations_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_annotations'))
    )
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_annotations_image_id'), ['image_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_annotations_image_id'))

    op.drop_table('annotations')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_sha256'))
        batch_op.drop_index(batch_op.f('ix_images_series_id'))
        batch_op.drop_index('ix_images_patient_captured')

    op.drop_table('images')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_id'))

    op.drop_table('series')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_patient_id'))

    op.drop_table('studies')
    with op.batch_alter_table('pms_links', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pms_links_patient_id'))

    op.drop_table('pms_links')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_patient_id'))
        batch_op.drop_index('ix_outbox_due')

    op.drop_table('outbox')
    with op.batch_alter_table('conflicts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conflicts_created_at'))

    op.drop_table('conflicts')
    with op.batch_alter_table('chart_aliases', schema=None) as batch_op:
        batch_op.drop_index('uq_chart_aliases_current', sqlite_where=sa.text('retired_at IS NULL'), postgresql_where=sa.text('retired_at IS NULL'), mssql_where=sa.text('retired_at IS NULL'))
        batch_op.drop_index(batch_op.f('ix_chart_aliases_patient_id'))
        batch_op.drop_index(batch_op.f('ix_chart_aliases_chart_number'))

    op.drop_table('chart_aliases')
    op.drop_table('processed_files')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_patients_name_key'))

    op.drop_table('patients')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_patient_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
