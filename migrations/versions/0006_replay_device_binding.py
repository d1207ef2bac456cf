"""Replays and device binding: a live photo's SHA-256 is looked up by an index on
(live_sha256, created_at); each record says whether its live photo had been decided on before
(`live_seen_before`, hashed into the chain when set); an API key can be bound to one device_id.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: records written before keep NULL, and their record_hash still verifies
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("live_seen_before", sa.Boolean(), nullable=True))
    op.create_index("ix_audit_records_live_sha256_created_at", "audit_records", ["live_sha256", "created_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("device_id", sa.String(128), nullable=True))
    op.create_index("ix_api_keys_device_id", "api_keys", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_api_keys_device_id", table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("device_id")
    op.drop_index("ix_audit_records_live_sha256_created_at", table_name="audit_records")
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("live_seen_before")
