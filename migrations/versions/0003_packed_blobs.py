"""packed blobs: a blob row says which pack holds it and where

Rows of blobs stored before packs keep pack = NULL and are read as loose
files; nothing already stored is converted.

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


def downgrade() -> None:
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blobs_pack"))
        batch_op.drop_column("offset")
        batch_op.drop_column("pack")
