"""lossy codecs: context blobs, promised bounds, fallbacks, codec trials

An encoding may need a side blob (a basis, a codebook) fitted on its series:
``context_blob``. It records the bound its codec promised next to the
measured error, and why the configured codec was replaced when it was.
``codec_trials`` keeps what ``auto`` tried on a series and what it chose.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("encodings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("context_blob", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("max_error_bound", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("fallback_reason", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_encodings_context_blob"), ["context_blob"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_encodings_context_blob_blobs"), "blobs",
                                    ["context_blob"], ["sha256"])
    # every encoding before this revision was made by a lossless codec or kept as received
    op.execute("UPDATE encodings SET max_error_bound = 0 WHERE kind = 'lossless'")
    op.create_table(
        "codec_trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("winner", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_codec_trials")),
    )
    with op.batch_alter_table("codec_trials", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_codec_trials_series_uid"), ["series_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("codec_trials", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_codec_trials_series_uid"))
    op.drop_table("codec_trials")
    with op.batch_alter_table("encodings", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_encodings_context_blob_blobs"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_encodings_context_blob"))
        batch_op.drop_column("fallback_reason")
        batch_op.drop_column("max_error_bound")
        batch_op.drop_column("context_blob")
