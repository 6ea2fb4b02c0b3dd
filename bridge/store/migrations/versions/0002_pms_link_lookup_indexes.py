"""pms link lookup indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pms_links', schema=None) as batch_op:
        batch_op.create_index('ix_pms_links_pms_id', ['pms_id'], unique=False)
        batch_op.create_index('ix_pms_links_system_id', ['pms_system', 'pms_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('pms_links', schema=None) as batch_op:
        batch_op.drop_index('ix_pms_links_system_id')
        batch_op.drop_index('ix_pms_links_pms_id')

