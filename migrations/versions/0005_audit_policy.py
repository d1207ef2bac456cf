"""The decision-policy rule and the kiosk's liveness result of a /verify call in its audit record.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: records written before keep NULL, and their record_hash (which covers these
    # columns only when set, service/records/audit.py) still verifies
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("rule", sa.String(64), nullable=True))
        batch.add_column(sa.Column("liveness", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("liveness")
        batch.drop_column("rule")
