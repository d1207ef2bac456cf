"""Operator console sessions and encrypted image retention.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retained_images",
        sa.Column("audit_id", sa.String(36),
                  sa.ForeignKey("audit_records.id", name="fk_retained_images_audit_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("audit_id", "side"),
        sa.CheckConstraint("side IN ('id', 'live')", name="ck_retained_images_side"),
    )
    op.create_index("ix_retained_images_created_at", "retained_images", ["created_at"])
    op.create_table(
        "console_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer(),
                  sa.ForeignKey("api_keys.id", name="fk_console_sessions_key_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("console_sessions")
    op.drop_table("retained_images")
