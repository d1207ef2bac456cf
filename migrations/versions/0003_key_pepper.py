"""API key digests under a server-side pepper: key_hash = HMAC-SHA256(IDV_KEY_PEPPER, SHA-256 hex).

The SHA-256 digests stored until now cannot be turned back into keys, but they are exactly
what the new digest is computed from, so every row is converted in place and every key keeps
working. The pepper is read as the service reads it (IDV_KEY_PEPPER; unset = empty). Run this
migration with the pepper the service will run with: another pepper invalidates every key.
There is no way back (downgrade refuses while keys exist: revoke and recreate them instead).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""
from __future__ import annotations

import hashlib
import hmac

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

keys = sa.table("api_keys", sa.column("id", sa.Integer), sa.column("key_hash", sa.String(64)))


def _pepper() -> bytes:
    pepper = context.config.attributes.get("key_pepper")
    if pepper is None:
        from service.settings import Settings

        pepper = Settings().key_pepper
    return (pepper or "").encode("utf-8")


def upgrade() -> None:
    conn = op.get_bind()
    pepper = _pepper()
    for row_id, digest in conn.execute(sa.select(keys.c.id, keys.c.key_hash)).all():
        peppered = hmac.new(pepper, digest.encode("ascii"), hashlib.sha256).hexdigest()
        conn.execute(keys.update().where(keys.c.id == row_id).values(key_hash=peppered))


def downgrade() -> None:
    if op.get_bind().execute(sa.select(sa.func.count()).select_from(keys)).scalar():
        raise RuntimeError("API key digests under the pepper cannot be turned back into SHA-256: "
                           "revoke and recreate the keys instead")
