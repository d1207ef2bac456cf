"""One data key per record's retained images, and (PostgreSQL) a record refused at commit past
its answer deadline.

`image_keys`: each record with retained images gets its own random AES-256 key, stored here
wrapped by IDV_IMAGE_KEY; `idverify audit purge` deletes it, so copies of the images' ciphertext
left in database pages or the WAL cannot be decrypted (service/records/retention.py). On
PostgreSQL the table is UNLOGGED, so no key ever reaches the WAL (and purge rewrites the table).
The price: after a PostgreSQL crash (not a clean restart) or on a standby the table is empty,
and the images retained until then can no longer be shown; records are unaffected.

`audit_records_answer_deadline` (PostgreSQL): a deferred trigger that refuses, at COMMIT, a record
whose transaction set `idv.answer_by` (service/records/audit.py append) when the server's clock is
past it: a COMMIT held up by a stopped server cannot land a decision its caller never got.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ANSWER_BY_FUNCTION = """
CREATE OR REPLACE FUNCTION idv_answer_by_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    answer_by text := current_setting('idv.answer_by', true);
BEGIN
    IF answer_by IS NOT NULL AND answer_by <> '' AND clock_timestamp() > answer_by::timestamptz THEN
        RAISE EXCEPTION 'audit record % committed past its answer deadline', NEW.id USING ERRCODE = 'IDV01';
    END IF;
    RETURN NULL;
END
$$
"""
ANSWER_BY_TRIGGER = """
CREATE CONSTRAINT TRIGGER audit_records_answer_deadline AFTER INSERT ON audit_records
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION idv_answer_by_check()
"""


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "image_keys",
        sa.Column("audit_id", sa.String(36), primary_key=True),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        prefixes=["UNLOGGED"] if postgresql else [],
    )
    if postgresql:
        op.execute(ANSWER_BY_FUNCTION)
        op.execute(ANSWER_BY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_records_answer_deadline ON audit_records")
        op.execute("DROP FUNCTION IF EXISTS idv_answer_by_check()")
    op.drop_table("image_keys")
