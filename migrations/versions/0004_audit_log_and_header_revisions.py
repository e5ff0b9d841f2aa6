"""audit log, header revisions, interrupted jobs

Administrators' changes (deletes, corrections, merges, repairs) are recorded
in ``audit_log``; a corrected instance keeps its previous headers in
``header_revisions``. Job status gains ``interrupted`` (a string column: no
schema change for it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 17:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_target"), ["target"], unique=False)
    op.create_table(
        "header_revisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("header_blob", sa.String(length=64), nullable=False),
        sa.Column("header_dictionary", sa.String(length=64), nullable=True),
        sa.Column("header_sha256", sa.String(length=64), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("audit_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], name=op.f("fk_header_revisions_instance_id_instances")),
        sa.ForeignKeyConstraint(["header_blob"], ["blobs.sha256"], name=op.f("fk_header_revisions_header_blob_blobs")),
        sa.ForeignKeyConstraint(["header_dictionary"], ["blobs.sha256"],
                                name=op.f("fk_header_revisions_header_dictionary_blobs")),
        sa.ForeignKeyConstraint(["audit_id"], ["audit_log.id"], name=op.f("fk_header_revisions_audit_id_audit_log")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_header_revisions")),
        sa.UniqueConstraint("instance_id", "revision", name=op.f("uq_header_revisions_instance_id")),
    )
    with op.batch_alter_table("header_revisions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_header_revisions_instance_id"), ["instance_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_header_revisions_header_blob"), ["header_blob"], unique=False)
        batch_op.create_index(batch_op.f("ix_header_revisions_audit_id"), ["audit_id"], unique=False)


def downgrade() -> None:
    op.drop_table("header_revisions")
    op.drop_table("audit_log")
