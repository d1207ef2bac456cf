"""API keys and the hash-chained audit trail.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_table(
        "audit_records",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id", name="fk_audit_records_key_id"), nullable=True),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("reference", sa.String(256), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("far_target", sa.Float(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("id_faces", sa.Integer(), nullable=True),
        sa.Column("id_box", sa.JSON(), nullable=True),
        sa.Column("id_quality", sa.JSON(), nullable=True),
        sa.Column("id_sha256", sa.String(64), nullable=True),
        sa.Column("live_faces", sa.Integer(), nullable=True),
        sa.Column("live_box", sa.JSON(), nullable=True),
        sa.Column("live_quality", sa.JSON(), nullable=True),
        sa.Column("live_sha256", sa.String(64), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_field", sa.String(64), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("timings_ms", sa.JSON(), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("images_retained", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("retain_until", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("seq", name="uq_audit_records_seq"),
    )
    for column in ("created_at", "device_id", "reference", "decision", "error_code"):
        op.create_index(f"ix_audit_records_{column}", "audit_records", [column])


def downgrade() -> None:
    op.drop_table("audit_records")
    op.drop_table("api_keys")
