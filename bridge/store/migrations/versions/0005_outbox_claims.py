"""outbox claims: which daemon holds a message in "sending", since when, and until when (its lease)

Several daemons share one store (scale-out on PostgreSQL). A message in "sending" belongs to the daemon
that claimed it while its lease lasts; a daemon settles only its own and those whose lease expired (a
daemon that died). Rows in "sending" from before this revision have no lease: they count as expired.
See bridge/outbox.py.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.Unicode(length=40), nullable=True))
        batch_op.add_column(sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
        batch_op.drop_column('claimed_at')
        batch_op.drop_column('claimed_by')
