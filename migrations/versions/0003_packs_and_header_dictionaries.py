"""packed blobs, header dictionaries

A blob row says which pack holds it and where; rows of blobs stored before
packs keep pack = NULL and are read as loose files. Headers may be compressed
with a zstd dictionary (itself a blob) that the instance names. Nothing
already stored is converted.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 16:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pack", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("offset", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_blobs_pack"), ["pack"], unique=False)
    op.create_table(
        "header_dictionaries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("bytes_plain", sa.BigInteger(), nullable=False),
        sa.Column("bytes_with", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["blob_sha256"], ["blobs.sha256"],
                                name=op.f("fk_header_dictionaries_blob_sha256_blobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_header_dictionaries")),
        sa.UniqueConstraint("blob_sha256", name=op.f("uq_header_dictionaries_blob_sha256")),
    )
    with op.batch_alter_table("header_dictionaries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_header_dictionaries_key"), ["key"], unique=False)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("header_dictionary", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_instances_header_dictionary"), ["header_dictionary"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_instances_header_dictionary_blobs"), "blobs",
                                    ["header_dictionary"], ["sha256"])


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_instances_header_dictionary_blobs"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_instances_header_dictionary"))
        batch_op.drop_column("header_dictionary")
    with op.batch_alter_table("header_dictionaries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_header_dictionaries_key"))
    op.drop_table("header_dictionaries")
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blobs_pack"))
        batch_op.drop_column("offset")
        batch_op.drop_column("pack")
