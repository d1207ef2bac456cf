"""Per-family scores of a /verify call in its audit record (score fusion).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: records written before keep NULL, and their record_hash (which covers these
    # columns only when set, service/records/audit.py) still verifies
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("scores", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("scoring", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("scoring")
        batch.drop_column("scores")
