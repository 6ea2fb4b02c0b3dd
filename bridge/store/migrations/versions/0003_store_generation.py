"""store generation: triggers that tell daemons a memoised read may be out of date

SQLite: a row-level trigger per watched table and change adds one to store_generation's single row.
PostgreSQL: a statement-level trigger per watched table notifies the pms_bridge_store channel (no shared
row that every writer would queue on). SQL Server: the table only; no read is memoised there.
See bridge/store/changes.py.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# As bridge.store.changes.WATCHED_TABLES when this revision was written (a migration is a snapshot).
WATCHED_TABLES = ("patients", "pms_links", "chart_aliases", "studies", "series", "images")
CHANNEL = "pms_bridge_store"
EVENTS = ("insert", "update", "delete")


def upgrade() -> None:
    op.create_table('store_generation',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_store_generation'))
    )
    op.execute("INSERT INTO store_generation (id, value) VALUES (1, 0)")
    dialect = op.get_context().dialect.name
    if dialect == "sqlite":
        for table in WATCHED_TABLES:
            for event in EVENTS:
                op.execute(
                    f"CREATE TRIGGER store_generation_{table}_{event} AFTER {event.upper()} ON {table} "
                    "BEGIN UPDATE store_generation SET value = value + 1 WHERE id = 1; END"
                )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION pms_bridge_store_changed() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME); RETURN NULL; END $$"
        )
        for table in WATCHED_TABLES:
            op.execute(
                f"CREATE TRIGGER store_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION pms_bridge_store_changed()"
            )


def downgrade() -> None:
    dialect = op.get_context().dialect.name
    if dialect == "sqlite":
        for table in WATCHED_TABLES:
            for event in EVENTS:
                op.execute(f"DROP TRIGGER store_generation_{table}_{event}")
    elif dialect == "postgresql":
        for table in WATCHED_TABLES:
            op.execute(f"DROP TRIGGER store_changed ON {table}")
        op.execute("DROP FUNCTION pms_bridge_store_changed()")
    op.drop_table('store_generation')
