"""one current chart number per patient: a partial unique index on chart_aliases(patient_id)

Simultaneous renumberings on PostgreSQL could each retire the old chart number and each add their own,
leaving a patient with several current chart numbers (the service now locks the patient first). Such
patients are repaired before the index is built: the newest current alias (highest id, the last
renumbering written) stays current, the older ones are retired as of the moment it was added, when they
stopped being current in effect. Each renumbering is already in the audit log (chart.renumber). How
many patients were repaired is left in the Alembic config's attributes ("charts_repaired"), which
bridge.store.db.upgrade_schema puts into its "schema upgraded" line.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# The id of the newest current alias of the patient of the row being updated (plain SQL: the offline
# SQL Server script has no connection to run a query on).
NEWEST_CURRENT = (
    "(SELECT MAX(newest.id) FROM chart_aliases newest"
    " WHERE newest.patient_id = chart_aliases.patient_id AND newest.retired_at IS NULL)"
)


def upgrade() -> None:
    if not context.is_offline_mode():  # an offline script has no connection to count on
        repaired = op.get_bind().execute(
            sa.text(
                "SELECT COUNT(DISTINCT patient_id) FROM chart_aliases"
                f" WHERE retired_at IS NULL AND id < {NEWEST_CURRENT}"
            )
        ).scalar()
        context.config.attributes["charts_repaired"] = int(repaired or 0)
    op.execute(
        "UPDATE chart_aliases SET retired_at = "
        f"(SELECT survivor.created_at FROM chart_aliases survivor WHERE survivor.id = {NEWEST_CURRENT})"
        f" WHERE retired_at IS NULL AND id < {NEWEST_CURRENT}"
    )
    op.create_index(
        'uq_chart_aliases_current_patient',
        'chart_aliases',
        ['patient_id'],
        unique=True,
        sqlite_where=sa.text('retired_at IS NULL'),
        postgresql_where=sa.text('retired_at IS NULL'),
        mssql_where=sa.text('retired_at IS NULL'),
    )


def downgrade() -> None:
    op.drop_index('uq_chart_aliases_current_patient', table_name='chart_aliases')
